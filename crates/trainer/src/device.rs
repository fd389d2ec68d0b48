//! `--device auto|cpu|cuda|cuda:N` parsing, shared by every command.

use tch::{Cuda, Device};

/// Turns a device string into a libtorch device: `auto` picks CUDA device 0 when one is available.
pub fn parse_device(spec: &str) -> anyhow::Result<Device> {
    let available = Cuda::device_count();
    let cuda = |index: usize| -> anyhow::Result<Device> {
        if (index as i64) < available {
            Ok(Device::Cuda(index))
        } else if available == 0 {
            anyhow::bail!("--device {spec}: CUDA is not available on this machine (use cpu or auto)")
        } else {
            anyhow::bail!("--device {spec}: only {available} CUDA device(s) are visible")
        }
    };
    match spec {
        "auto" => Ok(if available > 0 { Device::Cuda(0) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => cuda(index),
            _ => anyhow::bail!("--device {spec}: expected auto, cpu, cuda or cuda:N"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        let auto = parse_device("auto").unwrap();
        assert_eq!(auto == Device::Cpu, Cuda::device_count() == 0);
        assert!(parse_device("gpu").unwrap_err().to_string().contains("expected auto, cpu, cuda or cuda:N"));
        assert!(parse_device("cuda:99").is_err());
    }
}
