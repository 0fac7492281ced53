//! Test support: a real `nats-server` on a free loopback port.
//!
//! The server runs under a small shell watchdog whose standard input is a pipe from this
//! process: when the [`NatsServer`] is dropped, or this process exits in any way, the pipe
//! closes and the watchdog stops the server. No server outlives its test run.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What to do when `nats-server` is not installed.
pub const INSTALL_HINT: &str = "nats-server is not installed: the NATS tests run against a real server. \
Install it with `apt-get install nats-server` (Debian/Ubuntu), or run the tests with \
`cargo xtask test`, which installs it first.";

/// A running `nats-server`, stopped when dropped.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    watchdog: Child,
    pipe: Option<ChildStdin>,
    dir: PathBuf,
}

/// Where `nats-server` is, if installed (on `PATH`, or in the system directories Debian
/// uses, which are not on every user's `PATH`).
pub fn nats_server_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

impl NatsServer {
    /// Starts a server on 127.0.0.1 and a free port.
    ///
    /// # Panics
    /// When `nats-server` is not installed (with how to install it), or does not start.
    pub fn start() -> Self {
        Self::start_with(&[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a server on 127.0.0.1 and a free port, with extra command-line arguments.
    ///
    /// # Errors
    /// When `nats-server` is missing ([`INSTALL_HINT`]) or does not come up within 10 s.
    pub fn start_with(args: &[&str]) -> Result<Self, String> {
        Self::spawn(args, None)
    }

    /// One server for the whole test process, started on first use.
    ///
    /// # Panics
    /// As [`NatsServer::start`].
    pub fn shared() -> &'static NatsServer {
        static SERVER: OnceLock<NatsServer> = OnceLock::new();
        SERVER.get_or_init(NatsServer::start)
    }

    fn spawn(args: &[&str], port: Option<u16>) -> Result<Self, String> {
        let binary = nats_server_binary().ok_or_else(|| INSTALL_HINT.to_owned())?;
        let dir = std::env::temp_dir().join(format!(
            "aqe-nats-{}-{}",
            std::process::id(),
            aqe_core::MessageId::next()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let port_arg = port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        // The watchdog: runs the server, waits for its stdin to close, then stops it and
        // removes its directory (also for the shared server, which is never dropped).
        let script = r#"server="$1"; shift
log="$1"; shift
"$server" "$@" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$(dirname "$log")"' EXIT
read _unused
kill $pid 2>/dev/null
wait $pid"#;
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("aqe-nats-watchdog")
            .arg(&binary)
            .arg(dir.join("server.log"))
            .args(["-a", "127.0.0.1", "-p", &port_arg, "--ports_file_dir"])
            .arg(&dir)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run sh to start {}: {e}", binary.display()))?;
        let pipe = watchdog.stdin.take();
        let mut server = Self {
            port: 0,
            watchdog,
            pipe,
            dir,
        };
        server.port = wait_for_port(&server.dir).ok_or_else(|| {
            let log = std::fs::read_to_string(server.dir.join("server.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            format!(
                "{} did not report a listening port within 10 s; its log ends with:\n{}",
                binary.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })?;
        Ok(server)
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts a server on 127.0.0.1 and `port` (one a client was told of before any server
    /// listened there).
    ///
    /// # Errors
    /// As [`NatsServer::start_with`].
    pub fn start_on(port: u16) -> Result<Self, String> {
        Self::spawn(&[], Some(port))
    }

    /// Stops the server and starts a new one on the same port (clients reconnect).
    ///
    /// # Errors
    /// As [`NatsServer::start_with`].
    pub fn restart(&mut self) -> Result<(), String> {
        let port = self.port;
        self.stop();
        let fresh = Self::spawn(&[], Some(port))?;
        *self = fresh;
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.write_all(b"\n");
        }
        let _ = self.watchdog.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads the port from the ports file the server writes once it listens.
fn wait_for_port(dir: &Path) -> Option<u16> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.path().extension().is_none_or(|e| e != "ports") {
                    continue;
                }
                if let Ok(text) = std::fs::read_to_string(entry.path()) {
                    // {"nats":["nats://127.0.0.1:37793"]}, `tls://` with TLS.
                    let port = text.split("://127.0.0.1:").nth(1).and_then(|rest| {
                        rest.split(|c: char| !c.is_ascii_digit())
                            .next()
                            .and_then(|p| p.parse().ok())
                    });
                    if port.is_some() {
                        return port;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Packets as another member of the fleet could publish them, for tests of what an endpoint
/// does with traffic it did not expect (a misbehaving member of the account), and the
/// decoder fuzz targets drive.
pub mod forge {
    use bytes::{Bytes, BytesMut};

    pub use crate::wire::{NATS_WIRE_VERSION, Packet, PacketError, Subjects};
    use aqe_session::{EndpointId, Frame, Lane, Transmit};

    /// `packet`, as published.
    pub fn packet(packet: &Packet) -> Bytes {
        crate::wire::encode(packet).unwrap_or_default()
    }

    /// A [`Packet::Frames`] from `from` to `to` for session `session`, carrying `frames`.
    pub fn frames(from: EndpointId, to: EndpointId, session: u64, frames: &[Frame]) -> Bytes {
        let mut buf = BytesMut::new();
        let _ = crate::wire::encode_into(&Packet::Frames { from, to, session }, &mut buf);
        for f in frames {
            let _ = Transmit::Frame(Lane::Control, f.clone()).encode(&mut buf);
        }
        buf.freeze()
    }

    /// Decodes a packet and the frames after it, as an endpoint does with what it reads
    /// (for fuzzing: it must never panic). The number of frames, if all decode.
    ///
    /// # Errors
    /// What the endpoint would drop the packet for.
    pub fn decode(bytes: &[u8]) -> Result<(Packet, usize), String> {
        let (packet, rest) = crate::wire::decode(bytes).map_err(|e| e.to_string())?;
        let n = crate::wire::frames(rest).map_err(|e| e.to_string())?.len();
        Ok((packet, n))
    }
}
