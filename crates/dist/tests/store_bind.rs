//! The rendezvous store of a single-machine run listens on the loopback master address only, not on every
//! interface (issue 15, item 14): rank 0 is started alone, its listening socket is looked up in /proc/net, then
//! rank 1 joins and both finish.

use std::net::{IpAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dist::store_bind_address;

const WORKER: &str = env!("CARGO_BIN_EXE_dist-check");

fn spawn(rank: usize, port: u16) -> Child {
    let mut command = Command::new(WORKER);
    command.args(["collectives", "--timeout-secs", "60"]);
    command.env_remove("SLURM_PROCID");
    command
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start dist-check")
}

/// Local addresses (hex, as /proc/net/tcp{,6} print them) of the sockets listening on `port`.
fn listeners(port: u16) -> Vec<String> {
    let suffix = format!(":{port:04X}");
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is field 1, st (0A = LISTEN) field 3.
            if fields.len() > 3 && fields[3] == "0A" && fields[1].ends_with(&suffix) {
                found.push(fields[1].to_string());
            }
        }
    }
    found
}

#[test]
fn a_loopback_master_address_is_the_only_address_the_store_listens_on() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let rank0 = spawn(0, port);
    let start = Instant::now();
    let mut listening = listeners(port);
    while listening.is_empty() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
        listening = listeners(port);
    }
    let rank1 = spawn(1, port);
    for (rank, child) in [rank0, rank1].into_iter().enumerate() {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "rank {rank}: {}", String::from_utf8_lossy(&output.stderr));
    }
    // 127.0.0.1 is 0100007F in /proc/net/tcp; every-interface listeners are 00000000 or the IPv6 `::`.
    assert_eq!(listening, [format!("0100007F:{port:04X}")], "rank 0 listened on {listening:?}");
}

#[test]
fn only_loopback_master_addresses_restrict_the_store() {
    assert_eq!(store_bind_address("127.0.0.1"), Some(IpAddr::from([127, 0, 0, 1])));
    assert_eq!(store_bind_address("127.0.1.1"), Some(IpAddr::from([127, 0, 1, 1])));
    assert_eq!(store_bind_address("localhost"), Some(IpAddr::from([127, 0, 0, 1])));
    assert_eq!(store_bind_address("[::1]"), Some("::1".parse().unwrap()));
    assert_eq!(store_bind_address("10.0.0.5"), None);
    assert_eq!(store_bind_address("node-0.cluster"), None);
}
