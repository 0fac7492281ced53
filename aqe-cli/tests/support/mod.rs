//! What the tests of the `aqe` binary share: running it in a test's folder, certificates,
//! reading its lines.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) const AQE: &str = env!("CARGO_BIN_EXE_aqe");
pub(crate) const TOKEN: &str = "s3cret";

/// A child process killed when dropped.
pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `aqe ARGS` in `dir`, with none of the environment's joining options or log settings.
pub(crate) fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(AQE);
    // Contexts live in the test's folder, never in the user's.
    c.current_dir(dir)
        .args(args)
        .env("AQE_CONTEXT_DIR", dir.join(".aqe-contexts"));
    for var in [
        "AQE_TOKEN",
        "AQE_BOOTSTRAP",
        "AQE_CERTS",
        "AQE_NAME",
        "AQE_NATS",
        "AQE_FLEET",
        "AQE_CONTEXT",
        "XDG_CONFIG_HOME",
        "RUST_LOG",
    ] {
        c.env_remove(var);
    }
    c
}

pub(crate) fn aqe(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().expect("run aqe")
}

pub(crate) fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Starts `aqe ARGS` and returns it once a stdout line starts with `ready`, with that line.
pub(crate) fn spawn(
    dir: &Path,
    args: &[&str],
    ready: &str,
) -> (Running, String, BufReader<std::process::ChildStdout>) {
    let mut child = command(dir, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn aqe");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(Instant::now() < deadline, "{args:?} never said {ready}");
        if out.read_line(&mut line).expect("read") == 0 {
            panic!("{args:?} ended before saying {ready}");
        }
        if line.starts_with(ready) {
            return (running, line.trim().to_owned(), out);
        }
    }
}

/// `certs/` in `d`: a CA, a node certificate for 127.0.0.1 (`node`), and `cli`.
pub(crate) fn node_and_cli_certificates(d: &Path) {
    for args in [
        &["certs", "init", "certs"][..],
        &["certs", "issue", "certs", "node", "--ip", "127.0.0.1"],
        &["certs", "issue", "certs", "cli"],
    ] {
        let o = aqe(d, args);
        assert!(o.status.success(), "{}", stderr(&o));
    }
}

pub(crate) fn next_line(out: &mut BufReader<std::process::ChildStdout>) -> String {
    let mut line = String::new();
    out.read_line(&mut line).expect("read");
    line.trim().to_owned()
}

/// The status `child` exits with, within `within` (else the test fails, saying `what`).
pub(crate) fn exited(child: &mut Child, within: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `child` a signal (`INT`, `TERM`, ...) with the shell's own kill: no procps needed.
pub(crate) fn signal(child: &Child, name: &str) {
    let sent = Command::new("sh")
        .args(["-c", &format!("kill -{name} {}", child.id())])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill -{name}");
}
