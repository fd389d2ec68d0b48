//! The launcher environment: torchrun, Kubernetes' PyTorchJob and SLURM describe each process by variables.

use crate::DistError;

/// This process's place in a distributed run, as a launcher describes it.
///
/// torchrun and PyTorchJob set `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`. Under SLURM
/// (`srun`), `SLURM_PROCID`, `SLURM_NTASKS` and `SLURM_LOCALID` stand in for the first three when those are unset;
/// `MASTER_ADDR` and `MASTER_PORT` must still be exported by the batch script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Global rank of this process.
    pub rank: usize,
    /// Number of processes over all machines.
    pub world_size: usize,
    /// Rank on this machine (the GPU index under NCCL); equals `rank` when the launcher does not set it.
    pub local_rank: usize,
    /// Host of rank 0, which serves the rendezvous store.
    pub master_addr: String,
    /// Port of the rendezvous store.
    pub master_port: u16,
}

impl LaunchEnv {
    /// Reads the process environment. `Ok(None)` when no launcher variable (`RANK`, `WORLD_SIZE`,
    /// `SLURM_PROCID`) is set, i.e. a plain single-process run; an error naming the variable when one is
    /// malformed, missing or inconsistent.
    pub fn from_env() -> Result<Option<LaunchEnv>, DistError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`LaunchEnv::from_env`], reading variables through `lookup` (for tests and embedding).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>, DistError> {
        let torchrun = lookup("RANK").is_some() || lookup("WORLD_SIZE").is_some();
        let slurm = lookup("SLURM_PROCID").is_some();
        if !torchrun && !slurm {
            return Ok(None);
        }
        let (rank_var, world_var, local_var) = if torchrun {
            ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        } else {
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        };
        let rank: usize = parse(&lookup, rank_var)?;
        let world_size: usize = parse(&lookup, world_var)?;
        if world_size == 0 {
            return Err(DistError::Env { name: world_var, reason: "must be at least 1".into() });
        }
        if rank >= world_size {
            return Err(DistError::Env {
                name: rank_var,
                reason: format!("{rank} is not below {world_var}={world_size}"),
            });
        }
        let local_rank = match lookup(local_var) {
            Some(_) => parse(&lookup, local_var)?,
            None => rank,
        };
        if local_rank >= world_size {
            return Err(DistError::Env {
                name: local_var,
                reason: format!("{local_rank} is not below {world_var}={world_size}"),
            });
        }
        let master_addr = lookup("MASTER_ADDR").map(|v| v.trim().to_string()).unwrap_or_default();
        if master_addr.is_empty() {
            return Err(DistError::Env {
                name: "MASTER_ADDR",
                reason: format!("not set (needed with {rank_var}); set it to the host of rank 0"),
            });
        }
        let master_port: u16 = parse(&lookup, "MASTER_PORT")?;
        if master_port == 0 {
            return Err(DistError::Env { name: "MASTER_PORT", reason: "must be a port between 1 and 65535".into() });
        }
        Ok(Some(LaunchEnv { rank, world_size, local_rank, master_addr, master_port }))
    }
}

fn parse<T: std::str::FromStr>(lookup: &impl Fn(&str) -> Option<String>, name: &'static str) -> Result<T, DistError>
where
    T::Err: std::fmt::Display,
{
    let value = lookup(name).ok_or_else(|| DistError::Env { name, reason: "not set".into() })?;
    value
        .trim()
        .parse()
        .map_err(|e| DistError::Env { name, reason: format!("cannot parse `{value}` as a non-negative integer: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<Option<LaunchEnv>, DistError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        LaunchEnv::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn torchrun_variables() {
        let env = read(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            env,
            LaunchEnv { rank: 3, world_size: 8, local_rank: 1, master_addr: "node0".into(), master_port: 29500 }
        );
    }

    #[test]
    fn no_launcher_is_single_process() {
        assert_eq!(read(&[("MASTER_ADDR", "x")]).unwrap(), None);
    }

    #[test]
    fn slurm_fallback_and_local_rank_default() {
        let env = read(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "5"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((env.rank, env.world_size, env.local_rank), (5, 16, 5));
        let env =
            read(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap().unwrap();
        assert_eq!(env.local_rank, 1);
    }

    #[test]
    fn errors_name_the_variable() {
        let message = |vars: &[(&str, &str)]| read(vars).unwrap_err().to_string();
        let base = [("MASTER_ADDR", "h"), ("MASTER_PORT", "29500")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut v: Vec<(&str, &str)> = base.to_vec();
            v.extend_from_slice(extra);
            v
        };
        assert!(message(&with(&[("RANK", "0")])).starts_with("environment variable WORLD_SIZE: not set"));
        assert!(message(&with(&[("RANK", "x"), ("WORLD_SIZE", "2")])).contains("RANK: cannot parse `x`"));
        assert!(message(&with(&[("RANK", "2"), ("WORLD_SIZE", "2")])).contains("RANK: 2 is not below WORLD_SIZE=2"));
        assert!(message(&with(&[("RANK", "0"), ("WORLD_SIZE", "0")])).contains("WORLD_SIZE: must be at least 1"));
        assert!(message(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("MASTER_ADDR: not set"));
        assert!(message(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")])
            .contains("MASTER_PORT: cannot parse `70000`"));
    }
}
