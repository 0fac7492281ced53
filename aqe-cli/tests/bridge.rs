//! `aqe agent` (BRIDGE.md) in separate processes over real QUIC: the line protocol driven
//! line by line, and agents in Python and JavaScript (the clients in `clients/`) answering
//! each other and Rust agents.

mod support;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{
    AQE, Running, aqe, command, exited, node_and_cli_certificates, signal, stderr, stdout,
};

const WAIT: Duration = Duration::from_secs(30);
const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Lines of a child's output, read by a thread so that tests can wait with a deadline.
fn lines(out: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The first line `pick` accepts, within [`WAIT`].
fn line_where(rx: &mpsc::Receiver<String>, what: &str, pick: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if pick(&line) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line {what}: {e}"),
        }
    }
}

/// An `aqe agent` driven through its stdin and stdout, as a program would.
struct Bridge {
    process: Running,
    input: Option<ChildStdin>,
    events: mpsc::Receiver<String>,
    /// Its stdout while nobody reads it (see [`Bridge::start_unread`]).
    unread: Option<BufReader<std::process::ChildStdout>>,
    /// Events read while looking for another.
    seen: VecDeque<Value>,
    ready: Value,
}

impl Bridge {
    fn start(dir: &Path, args: &[&str]) -> Self {
        let mut b = Self::start_unread(dir, args);
        b.resume();
        b
    }

    /// Started, its `ready` read, and nothing more until [`Bridge::resume`]: a program that
    /// does not read its input.
    fn start_unread(dir: &Path, args: &[&str]) -> Self {
        let mut child = command(dir, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn aqe agent");
        let input = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        out.read_line(&mut first).expect("the ready line");
        let ready: Value = serde_json::from_str(&first).expect("JSON");
        assert_eq!(ready["type"], "ready", "{ready}");
        assert_eq!(ready["bridge"], 1);
        Self {
            process: Running(child),
            input,
            events: mpsc::channel().1,
            unread: Some(out),
            seen: VecDeque::new(),
            ready,
        }
    }

    /// Reads its events from now on.
    fn resume(&mut self) {
        if let Some(out) = self.unread.take() {
            self.events = lines(out);
        }
    }

    fn line(&mut self, line: &str) {
        let input = self.input.as_mut().expect("stdin open");
        writeln!(input, "{line}").expect("write a line");
        input.flush().expect("flush");
    }

    fn send(&mut self, command: Value) {
        self.line(&command.to_string());
    }

    fn next(&mut self) -> Value {
        let line = self.events.recv_timeout(WAIT).expect("an event");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// The first event `pick` accepts (seen before, or next); others wait their turn.
    fn until(&mut self, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.seen.iter().position(&pick) {
            return self.seen.remove(i).expect("seen");
        }
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let e = self.next();
            if pick(&e) {
                return e;
            }
            self.seen.push_back(e);
        }
        panic!("no event {what}; seen {:?}", self.seen);
    }

    /// The answer to the command with `ref` (`ok`, `error` or `response`).
    fn answer(&mut self, reference: u64) -> Value {
        self.until(&format!("answering ref {reference}"), |e| {
            e["ref"] == json!(reference)
        })
    }

    fn call(&mut self, mut command: Value, reference: u64) -> Value {
        command["ref"] = json!(reference);
        self.send(command);
        self.answer(reference)
    }

    fn exit_status(mut self) -> std::process::ExitStatus {
        drop(self.input.take());
        exited(&mut self.process.0, WAIT, "the bridge")
    }
}

/// `aqe agent NAME` listening on loopback with the node certificate (`extra` options
/// after), its events not read yet.
fn listening(d: &Path, name: &str, extra: &[&str]) -> Bridge {
    let mut args = vec![
        "agent",
        name,
        "--listen",
        "127.0.0.1:0",
        "--certs",
        "certs",
        "--name",
        "node",
    ];
    args.extend_from_slice(extra);
    Bridge::start_unread(d, &args)
}

/// `aqe agent NAME` joining through `at` with the command-line certificate.
fn joining(d: &Path, name: &str, at: &str, extra: &[&str]) -> Bridge {
    let mut args = vec![
        "agent",
        name,
        "--bootstrap",
        at,
        "--certs",
        "certs",
        "--name",
        "cli",
    ];
    args.extend_from_slice(extra);
    Bridge::start(d, &args)
}

#[test]
fn the_bridge_protocol_as_bridge_md_specifies_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    node_and_cli_certificates(d);
    let mut a = listening(d, "a", &["--max-line", "1024"]);
    a.resume();
    let at = a.ready["at"].as_str().expect("at").to_owned();
    assert_eq!(a.ready["transports"], json!(["quic"]));
    let mut b = joining(d, "b", &at, &["--capability", "tester", "--type", "probe"]);
    let joined = a.until("b joined", |e| {
        e["type"] == "peerJoined" && e["peer"]["id"] == "b"
    });
    // Every bridged agent takes streams, and says so (PROTOCOL.md, `aqe.streams`).
    assert_eq!(
        joined["peer"]["capabilities"],
        json!(["tester", "aqe.streams"])
    );

    // Bad lines are answered, and the agent goes on.
    a.line("garbage");
    let e = a.until("badLine", |e| e["type"] == "error");
    assert_eq!(
        (&e["code"], &e["ref"]),
        (&json!("badLine"), &Value::Null),
        "{e}"
    );
    a.line(r#"{"ref":1}"#);
    assert_eq!(a.answer(1)["code"], "unknownOp");
    assert_eq!(a.call(json!({"op": "fly"}), 2)["code"], "unknownOp");
    a.line(&format!(
        r#"{{"op":"send","to":"b","text":"{}"}}"#,
        "x".repeat(2000)
    ));
    let e = a.until("lineTooLong", |e| e["code"] == "lineTooLong");
    assert_eq!(e["type"], "error");
    let e = a.call(
        json!({"op": "send", "to": "b", "text": "t", "base64": "AA=="}),
        3,
    );
    assert_eq!(
        (&e["type"], &e["code"], &e["op"]),
        (&json!("error"), &json!("badField"), &json!("send"))
    );
    assert_eq!(
        a.call(json!({"op": "send", "to": "b", "trace": "00-zz"}), 4)["code"],
        "badField"
    );

    // Discovery with a filter and a limit.
    let found = a.call(json!({"op": "discover", "capability": "tester"}), 5);
    let ids: Vec<&Value> = found["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| &p["id"])
        .collect();
    assert_eq!(ids, [&json!("b")], "{found}");
    assert_eq!(found["peers"][0]["agentType"], "probe");
    let none = a.call(json!({"op": "discover", "agentType": "nobody"}), 6);
    assert_eq!(none["peers"], json!([]));
    let one = a.call(json!({"op": "discover", "limit": 1}), 7);
    assert_eq!(one["peers"].as_array().map(Vec::len), Some(1));

    // A confirmed send: answered once b's program has the line.
    let sent = a.call(
        json!({"op": "send", "to": "b", "text": "hello", "confirm": true}),
        8,
    );
    assert_eq!(sent["type"], "ok", "{sent}");
    let m = b.until("the message", |e| e["type"] == "message");
    assert_eq!(
        (&m["from"], &m["text"], &m["channel"]),
        (&json!("a"), &json!("hello"), &json!("coordination"))
    );
    assert_eq!((&m["id"], &m["redelivered"]), (&sent["id"], &json!(false)));

    // A traced request, answered by b's program.
    a.send(json!({"op": "request", "ref": 9, "to": "b", "payload": {"q": 1}, "trace": TRACE}));
    let r = b.until("the request", |e| e["type"] == "request");
    assert_eq!(
        (&r["payload"], &r["trace"]),
        (&json!({"q": 1}), &json!(TRACE)),
        "{r}"
    );
    b.send(json!({"op": "reply", "id": r["id"], "payload": {"a": 1}}));
    let answer = a.answer(9);
    assert_eq!(
        (&answer["type"], &answer["from"], &answer["payload"]),
        (&json!("response"), &json!("b"), &json!({"a": 1}))
    );
    // An error reply reaches the requester as `remote`.
    a.send(json!({"op": "request", "ref": 10, "to": "b", "text": "fail please"}));
    let r = b.until("the second request", |e| e["type"] == "request");
    assert_eq!(r["text"], "fail please");
    b.send(json!({"op": "reply", "id": r["id"], "error": "no, thanks"}));
    let e = a.answer(10);
    assert_eq!(e["code"], "remote", "{e}");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("no, thanks")),
        "{e}"
    );
    // A reply to nothing.
    let e = b.call(json!({"op": "reply", "id": r["id"], "text": "late"}), 11);
    assert_eq!(e["code"], "unknownRequest");

    // A stream: text, then bytes that are not UTF-8, then its end.
    let opened = a.call(json!({"op": "streamOpen", "to": "b"}), 12);
    let n = opened["stream"].clone();
    assert!(n.is_u64(), "{opened}");
    a.send(json!({"op": "streamWrite", "stream": n, "text": "one\n"}));
    let acked = a.call(
        json!({"op": "streamWrite", "stream": n, "base64": "AP8=", "fin": true, "ack": true}),
        13,
    );
    assert_eq!(acked["type"], "ok", "{acked}");
    let o = b.until("stream opened", |e| e["type"] == "streamOpened");
    assert_eq!(o["from"], "a");
    let mut data = Vec::new();
    loop {
        let c = b.until("a chunk", |e| {
            e["type"] == "chunk" || e["type"] == "streamClosed"
        });
        if c["type"] == "streamClosed" {
            assert!(c.get("error").is_none(), "{c}");
            break;
        }
        assert_eq!(c["stream"], o["stream"]);
        match (c["text"].as_str(), c["base64"].as_str()) {
            (Some(t), None) => data.extend_from_slice(t.as_bytes()),
            (None, Some(b64)) => {
                assert_eq!(b64, "AP8=");
                data.extend_from_slice(&[0, 255]);
            }
            _ => panic!("a chunk has text or base64: {c}"),
        }
    }
    assert_eq!(data, b"one\n\x00\xff");
    let e = a.call(
        json!({"op": "streamWrite", "stream": n, "text": "more"}),
        14,
    );
    assert_eq!(e["code"], "stream", "a finished stream takes no more: {e}");

    // A broadcast, statistics.
    let report = a.call(json!({"op": "broadcast", "payload": {"all": true}}), 15);
    assert_eq!(report["delivered"], json!(["b"]), "{report}");
    let m = b.until("the broadcast", |e| {
        e["type"] == "message" && e["payload"] == json!({"all": true})
    });
    assert_eq!(m["from"], "a");
    assert_eq!(
        m["id"], report["id"],
        "the report names the copies' id: {report}"
    );
    let stats = a.call(json!({"op": "stats"}), 16);
    assert!(
        stats["stats"]["messagesSent"]
            .as_u64()
            .is_some_and(|n| n >= 2),
        "{stats}"
    );
    assert_eq!(stats["health"]["status"], "healthy", "{stats}");

    // b leaves: a hears it, and a send to b has nowhere to go.
    b.send(json!({"op": "leave"}));
    assert!(b.exit_status().success());
    a.until("b left", |e| e["type"] == "peerLeft" && e["agent"] == "b");
    assert_eq!(
        a.call(json!({"op": "send", "to": "b", "text": "x"}), 17)["code"],
        "notFound"
    );
    // The end of its input ends the bridge cleanly.
    assert!(a.exit_status().success());
}

/// A program that stops reading holds its senders back: the bridge stops taking messages,
/// the sender's sends wait and then fail `busy`; once it reads again, everything answered
/// `ok` arrives, once and in order, and nothing answered `busy` does.
#[test]
fn a_program_that_stops_reading_holds_senders_back_and_loses_nothing() {
    const N: u64 = 3000;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    node_and_cli_certificates(d);
    let mut b = listening(d, "b", &["--inbox", "4"]);
    let at = b.ready["at"].as_str().expect("at").to_owned();
    let mut a = joining(d, "a", &at, &[]);
    a.until("b joined", |e| {
        e["type"] == "peerJoined" && e["peer"]["id"] == "b"
    });
    // b's program reads nothing from here on, while a's sends every line it can.
    let mut input = a.input.take().expect("a's stdin");
    let writer = std::thread::spawn(move || {
        for i in 0..N {
            let line = json!({"op": "send", "ref": i, "to": "b", "payload": i}).to_string();
            if writeln!(input, "{line}").is_err() {
                return None;
            }
        }
        // Kept open until the test is done: the end of input would end a.
        Some(input)
    });
    let mut answered = vec![None; N as usize];
    let mut first_busy = None;
    while first_busy.is_none() {
        let e = a.until("an answer", |e| e["type"] == "ok" || e["type"] == "error");
        let i = e["ref"].as_u64().expect("ref") as usize;
        if e["type"] == "error" {
            assert_eq!(e["code"], "busy", "{e}");
            first_busy = Some(i);
        }
        answered[i] = Some(e["type"] == "ok");
    }
    let busy_at = first_busy.expect("busy");
    assert!(
        busy_at > 4,
        "the inbox and the window took some first ({busy_at})"
    );
    // b's program reads again: everything sent arrives.
    b.resume();
    let mut got = Vec::new();
    let mut a_done = answered.iter().filter(|x| x.is_some()).count();
    while a_done < N as usize {
        let e = a.until("an answer", |e| e["type"] == "ok" || e["type"] == "error");
        let i = e["ref"].as_u64().expect("ref") as usize;
        assert!(answered[i].is_none(), "one answer per command");
        answered[i] = Some(e["type"] == "ok");
        a_done += 1;
        while let Ok(line) = b.events.try_recv() {
            let m: Value = serde_json::from_str(&line).expect("JSON");
            if m["type"] == "message" {
                got.push(m["payload"].as_u64().expect("a number"));
            }
        }
    }
    let sent: Vec<u64> = (0..N)
        .filter(|i| answered[*i as usize] == Some(true))
        .collect();
    while got.len() < sent.len() {
        let m = b.until("a message", |e| e["type"] == "message");
        got.push(m["payload"].as_u64().expect("a number"));
    }
    assert_eq!(
        got, sent,
        "every message answered ok, once, in order; none answered busy"
    );
    let input = writer.join().expect("writer");
    drop(input);
    assert!(a.exit_status().success());
    assert!(b.exit_status().success());
}

fn clients() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients")
}

/// `program --version` runs: the tests need Python 3 and Node (`cargo xtask test` installs
/// them when missing). They never skip.
fn require(program: &str) {
    let ok = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{program} is not installed: the bridge tests run Python and Node agents (apt-get install python3 nodejs, or cargo xtask test)"
    );
}

#[test]
fn python_and_node_agents_answer_each_other_and_rust_agents_over_quic() {
    require("python3");
    require("node");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    node_and_cli_certificates(d);
    let python = clients().join("python/example.py");
    let node = clients().join("node/example.mjs");
    // The Python agent: a child of its bridge, which listens for the others.
    let mut py = command(
        d,
        &[
            "agent",
            "py",
            "--listen",
            "127.0.0.1:0",
            "--certs",
            "certs",
            "--name",
            "node",
            "--",
            "python3",
            python.to_str().expect("path"),
            "--ask",
            "js",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn the Python agent");
    let py_says = lines(py.stderr.take().expect("stderr"));
    let py = Running(py);
    let ready = line_where(&py_says, "py ready", |l| l.starts_with("py: ready at "));
    let at = ready.trim_start_matches("py: ready at ").to_owned();
    // The JavaScript agent: it runs its own bridge, joining as the environment says.
    let mut js = Command::new("node")
        .arg(&node)
        .args(["js", "--ask", "py"])
        .current_dir(d)
        .env("AQE", AQE)
        .env("AQE_BOOTSTRAP", &at)
        .env("AQE_CERTS", "certs")
        .env("AQE_NAME", "cli")
        .env("AQE_CONTEXT_DIR", d.join(".aqe-contexts"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the Node agent");
    let js_stdin = js.stdin.take();
    let js_says = lines(js.stdout.take().expect("stdout"));
    let mut js = Running(js);
    line_where(&js_says, "js ready", |l| l.starts_with("js: ready at "));

    // They ask each other; the trace Python sends arrives in JavaScript.
    let asked = line_where(&js_says, "js asked py", |l| l.starts_with("js asked py: "));
    let answer: Value =
        serde_json::from_str(asked.trim_start_matches("js asked py: ")).expect("JSON");
    assert_eq!(
        answer,
        json!({"agent": "py", "language": "python", "got": {"from": "js"}, "trace": null})
    );
    let asked = line_where(&py_says, "py asked js", |l| l.starts_with("py asked js: "));
    let answer: Value =
        serde_json::from_str(asked.trim_start_matches("py asked js: ")).expect("JSON");
    assert_eq!(
        answer,
        json!({"agent": "js", "language": "javascript", "got": {"from": "py"}, "trace": TRACE})
    );

    // Rust agents (the command) ask both.
    for (agent, language) in [("py", "python"), ("js", "javascript")] {
        let o = aqe(
            d,
            &[
                "request",
                agent,
                r#"{"n":1}"#,
                "--bootstrap",
                &at,
                "--certs",
                "certs",
                "--name",
                "cli",
                "--format",
                "json",
            ],
        );
        assert!(o.status.success(), "request {agent}: {}", stderr(&o));
        let doc: Value = serde_json::from_str(&stdout(&o)).expect("a JSON document");
        assert_eq!(doc["from"], agent);
        assert_eq!(
            doc["payload"],
            json!({"agent": agent, "language": language, "got": {"n": 1}, "trace": null})
        );
    }

    // The Node agent leaves when its stdin ends; the Python one when its bridge is told to stop.
    drop(js_stdin);
    let status = exited(&mut js.0, WAIT, "the Node agent");
    assert!(status.success(), "node: {status}");
    let mut py = py;
    signal(&py.0, "TERM");
    let status = exited(&mut py.0, WAIT, "the Python agent's bridge");
    assert!(status.success(), "aqe agent py: {status}");
}
