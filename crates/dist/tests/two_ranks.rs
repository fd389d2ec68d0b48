//! Two processes on 127.0.0.1 over Gloo: each test starts two `dist-check` ranks and checks their exit status
//! and messages. The scenarios themselves (src/bin/dist-check.rs) compare every result with its expected value.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WORKER: &str = env!("CARGO_BIN_EXE_dist-check");

/// A port that was free a moment ago (the OS picks it; the listener is closed before the ranks start).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

enum Launch {
    /// Rank and rendezvous on the command line.
    Args,
    /// Rank and rendezvous in RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
    Env,
}

fn spawn(scenario: &str, rank: usize, port: u16, timeout_secs: u64, launch: &Launch) -> Child {
    let mut command = Command::new(WORKER);
    command.arg(scenario).args(["--timeout-secs", &timeout_secs.to_string()]);
    for name in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"] {
        command.env_remove(name);
    }
    match launch {
        Launch::Args => {
            command.args(["--rank", &rank.to_string(), "--world-size", "2", "--port", &port.to_string()]);
        }
        Launch::Env => {
            command
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string());
        }
    }
    command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("cannot start dist-check")
}

struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
}

fn finish(child: Child) -> Outcome {
    let output = child.wait_with_output().unwrap();
    Outcome {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `scenario` on two ranks and asserts that both succeed.
fn run_pair(scenario: &str, launch: Launch) {
    let port = free_port();
    let children: Vec<Child> = (0..2).map(|rank| spawn(scenario, rank, port, 30, &launch)).collect();
    for (rank, child) in children.into_iter().enumerate() {
        let outcome = finish(child);
        assert!(
            outcome.success && outcome.stdout.contains(&format!("rank {rank}: {scenario} ok")),
            "rank {rank} of {scenario} failed\nstdout:\n{}\nstderr:\n{}",
            outcome.stdout,
            outcome.stderr
        );
    }
}

#[test]
fn collectives_agree_across_two_ranks() {
    run_pair("collectives", Launch::Args);
}

#[test]
fn bucketed_gradients_are_the_mean_of_the_ranks_gradients() {
    run_pair("grads", Launch::Args);
}

#[test]
fn sync_batch_norm_matches_batch_norm_over_both_batches() {
    run_pair("syncbn", Launch::Args);
}

#[test]
fn sync_batch_norm_with_an_empty_rank_matches_batch_norm_and_does_not_hang() {
    run_pair("syncbn-empty-rank", Launch::Args);
}

#[test]
fn data_parallel_sgd_matches_one_process_with_the_whole_batch() {
    run_pair("train", Launch::Args);
}

#[test]
fn overlapped_reducer_is_bitwise_equal_to_the_bucketed_all_reduce() {
    run_pair("overlap", Launch::Args);
}

#[test]
fn overlapped_reducer_reports_ranks_that_use_different_parameters() {
    let start = Instant::now();
    run_pair("overlap-mismatch", Launch::Args);
    assert!(start.elapsed() < Duration::from_secs(20), "the mismatch took {:?} to report", start.elapsed());
}

#[test]
fn launcher_environment_starts_a_group() {
    run_pair("collectives", Launch::Env);
}

/// Reads `child`'s stdout until a line containing `marker`, then returns; panics if it exits first.
fn wait_for_line(child: &mut Child, marker: &str) {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains(marker) => return,
            Some(Ok(_)) => continue,
            _ => {
                let mut stderr = String::new();
                child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
                panic!("worker ended before printing `{marker}`; stderr:\n{stderr}");
            }
        }
    }
}

/// Starts `scenario` on two ranks, kills rank `victim` once it is ready, and checks the survivor's error.
fn kill_one_rank(scenario: &str, victim: usize) {
    const TIMEOUT_SECS: u64 = 5;
    let port = free_port();
    let mut children: Vec<Child> =
        (0..2).map(|rank| spawn(scenario, rank, port, TIMEOUT_SECS, &Launch::Args)).collect();
    let survivor_rank = 1 - victim;
    let survivor = children.remove(survivor_rank);
    let mut killed = children.remove(0);
    wait_for_line(&mut killed, "ready to be killed");
    killed.kill().unwrap();
    let killed_at = Instant::now();
    killed.wait().unwrap();
    let outcome = finish(survivor);
    let elapsed = killed_at.elapsed();
    assert!(!outcome.success, "the survivor should fail; stdout:\n{}", outcome.stdout);
    assert!(elapsed < Duration::from_secs(TIMEOUT_SECS + 3), "the survivor took {elapsed:?} to stop");
    assert!(
        outcome.stderr.contains(&format!("rank {survivor_rank}: all_reduce"))
            && outcome.stderr.contains("a peer may have died"),
        "unexpected error: {}",
        outcome.stderr
    );
}

#[test]
fn killed_peer_makes_the_survivor_fail_with_the_rank() {
    kill_one_rank("die", 1);
}

#[test]
fn killed_master_makes_the_survivor_fail_with_the_rank() {
    kill_one_rank("die-master", 0);
}

#[test]
fn hung_peer_makes_the_other_rank_time_out() {
    const TIMEOUT_SECS: u64 = 3;
    let port = free_port();
    let waiting = spawn("hang", 0, port, TIMEOUT_SECS, &Launch::Args);
    let mut hung = spawn("hang", 1, port, TIMEOUT_SECS, &Launch::Args);
    wait_for_line(&mut hung, "hanging");
    let start = Instant::now();
    let outcome = finish(waiting);
    let elapsed = start.elapsed();
    hung.kill().unwrap();
    hung.wait().unwrap();
    assert!(!outcome.success, "the waiting rank should fail; stdout:\n{}", outcome.stdout);
    assert!(
        elapsed >= Duration::from_secs(TIMEOUT_SECS - 1) && elapsed < Duration::from_secs(TIMEOUT_SECS + 4),
        "the waiting rank stopped after {elapsed:?}, expected about {TIMEOUT_SECS} s"
    );
    assert!(
        outcome.stderr.contains("rank 0: all_reduce timed out after 3s (a peer may have died or hung)"),
        "unexpected error: {}",
        outcome.stderr
    );
}

#[test]
fn missing_peer_fails_the_rendezvous_within_the_timeout() {
    let start = Instant::now();
    let outcome = finish(spawn("collectives", 0, free_port(), 2, &Launch::Args));
    assert!(!outcome.success);
    assert!(start.elapsed() < Duration::from_secs(10), "rendezvous took {:?} to fail", start.elapsed());
    assert!(
        outcome.stderr.contains("rank 0: cannot initialise the gloo process group (world size 2"),
        "unexpected error: {}",
        outcome.stderr
    );
}
