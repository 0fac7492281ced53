//! The `aqe` binary in separate processes: certificates, a node from a definition folder,
//! and commands joining it over real QUIC with mutual TLS and a token; every bad input with
//! its exit code and its one-line message.

use std::io::BufReader;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::{
    AQE, Running, TOKEN, aqe, command, exited, next_line, node_and_cli_certificates, signal, spawn,
    stderr, stdout,
};

#[test]
fn a_fleet_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // Certificates: a CA, a node, a command-line client.
    let o = aqe(d, &["certs", "init", "certs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A certificate per role (processes may also share one: see the test below).
    for name in ["node", "cli", "listener", "replier"] {
        let o = aqe(d, &["certs", "issue", "certs", name, "--ip", "127.0.0.1"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(d.join(format!("certs/{name}.pem")).exists());
        assert!(d.join(format!("certs/{name}.key")).exists());
    }
    // A node from a definition folder, written as people write them.
    std::fs::create_dir(d.join("fleet")).expect("mkdir");
    std::fs::write(
        d.join("fleet/worker.jsonc"),
        r#"{
  // answers requests
  "id": "worker",
  "type": "qe-test-executor",
  "enableQUIC": true,
  "quicConfig": {
    "host": "127.0.0.1", "port": 0,
    "security": { "certPath": "../certs/node.pem", "keyPath": "../certs/node.key",
                  "caPath": "../certs/ca.pem", "verifyPeer": true,
                  "enableTokenAuth": true, "token": "s3cret" },
  },
}"#,
    )
    .expect("definition");
    let (_node, listening, _out) = spawn(d, &["node", "fleet"], "listening on ");
    let addr = listening.trim_start_matches("listening on ").to_owned();
    let join_as = |name: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--bootstrap", &addr, "--certs", "certs", "--name", name]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let join = |extra: &[&str]| join_as("cli", extra);
    let run = |cmd: &[&str], extra: &[&'static str]| -> Output {
        let mut args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        args.extend(join(extra));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        aqe(d, &args)
    };

    // A JSON request, echoed by the node's agent.
    let o = run(
        &["request", "worker", r#"{"task":"lint","n":3}"#],
        &["--token", TOKEN],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), r#"{"n":3,"task":"lint"}"#);

    // Peers.
    let o = run(&["peers"], &["--token", TOKEN]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("id\ttype\tstate\tchannels\n"),
        "a header first: {}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains("worker\tqe-test-executor"),
        "{}",
        stdout(&o)
    );

    // What the node's endpoint says about itself: links and agents.
    let o = run(&["stats"], &["--token", TOKEN]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("QUIC listen"), "{text}");
    assert!(text.contains("worker "), "{text}");
    let o = run(&["top", "--once"], &["--token", TOKEN]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("rtt ms") && text.contains("cwnd") && text.contains("worker"),
        "{text}"
    );
    // The same for scripts: one JSON document each.
    let doc = |args: &[&str]| -> serde_json::Value {
        let o = run(args, &["--token", TOKEN]);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        serde_json::from_str(&stdout(&o))
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {}", stdout(&o)))
    };
    let peers = doc(&["peers", "--format", "json"]);
    assert!(
        peers
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p["id"] == "worker")),
        "{peers}"
    );
    let stats = doc(&["stats", "--format", "json"]);
    assert!(
        stats
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["report"]["agents"]
                .as_array()
                .is_some_and(|ags| ags.iter().any(|ag| ag["id"] == "worker")))),
        "{stats}"
    );
    let top = doc(&["top", "--once", "--format", "json"]);
    assert!(top.is_array(), "{top}");
    let health = doc(&["health", "--format", "json"]);
    assert!(
        health.as_array().is_some_and(|a| a
            .iter()
            .any(|h| h["agent"] == "worker" && h["status"] == "Healthy")),
        "{health}"
    );

    let o = run(&["health"], &["--token", TOKEN]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("agent\tstatus\treason\n"),
        "a header first: {}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("worker\tHealthy"), "{}", stdout(&o));

    // The node's certificate names 127.0.0.1 (`--ip`): a dialer may check the address too.
    let o = run(
        &["request", "worker", "checked"],
        &["--token", TOKEN, "--check-address"],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    // The joining options saved once as a context, then no option on the line at all.
    let mut add = vec!["context", "add", "lab"];
    let options = join(&["--token", TOKEN]);
    add.extend(options.iter().map(String::as_str));
    let o = aqe(d, &add);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = aqe(d, &["context", "select", "lab"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = aqe(d, &["context", "ls"]);
    assert_eq!(stdout(&o), "* lab\n");
    let o = aqe(d, &["context", "show"]);
    assert!(
        stdout(&o).contains("(hidden)") && !stdout(&o).contains(TOKEN),
        "{}",
        stdout(&o)
    );
    let o = aqe(d, &["request", "worker", r#"{"from":"context"}"#]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), r#"{"from":"context"}"#);
    // What the line says wins: a wrong token is refused.
    let o = aqe(d, &["request", "worker", "x", "--token", "wrong"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let o = aqe(d, &["context", "rm", "lab"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = aqe(d, &["request", "worker", "x", "--context", "lab"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));

    // A listener and a replier in their own processes, found through the node.
    let mut listen_args = vec!["listen", "inbox"];
    let joined = join_as("listener", &["--token", TOKEN]);
    listen_args.extend(joined.iter().map(String::as_str));
    let (_listener, _, mut heard) = spawn(d, &listen_args, "agent inbox listening");
    let mut reply_args = vec!["reply", "upper", "--command", "tr a-z A-Z", "--count", "1"];
    let joined = join_as("replier", &["--token", TOKEN]);
    reply_args.extend(joined.iter().map(String::as_str));
    let (_replier, _, _) = spawn(d, &reply_args, "agent upper answering");

    let o = run(&["send", "inbox", r#"{"x":1}"#], &["--token", TOKEN]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = next_line(&mut heard);
    assert!(line.ends_with(r#"[coordination] {"x":1}"#), "{line}");

    let o = run(
        &["broadcast", "everyone", "--raw", "--min-peers", "3"],
        &["--token", TOKEN],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("sent to worker"), "{}", stdout(&o));
    assert!(stdout(&o).contains("sent to inbox"), "{}", stdout(&o));
    let line = next_line(&mut heard);
    assert!(line.ends_with("[coordination] everyone"), "{line}");
    // Confirmed: said once each recipient's handler has it.
    let o = run(
        &[
            "broadcast",
            "all-taken",
            "--raw",
            "--min-peers",
            "3",
            "--confirm",
        ],
        &["--token", TOKEN],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("taken by worker"), "{}", stdout(&o));
    assert!(stdout(&o).contains("taken by inbox"), "{}", stdout(&o));
    let line = next_line(&mut heard);
    assert!(line.ends_with("[coordination] all-taken"), "{line}");

    // Standard input as a stream, line by line.
    let mut args: Vec<String> = ["stream", "inbox"].iter().map(|s| s.to_string()).collect();
    args.extend(join(&["--token", TOKEN]));
    let mut child = Command::new(AQE)
        .current_dir(d)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("aqe stream");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"first line\nsecond line\n")
            .expect("write");
    }
    let o = child.wait_with_output().expect("stream ends");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("streamed 2 lines to inbox"),
        "{}",
        stderr(&o)
    );
    assert!(next_line(&mut heard).ends_with("[stream] first line"));
    assert!(next_line(&mut heard).ends_with("[stream] second line"));

    // A short benchmark against the node's agent.
    let o = run(
        &[
            "bench",
            "worker",
            "--requests",
            "50",
            "--concurrency",
            "2",
            "--messages",
            "200",
        ],
        &["--token", TOKEN],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("request/response: 50 requests of 64 B, 2 at once"),
        "{text}"
    );
    assert!(
        text.contains("p99") && text.contains("one-way: 200 messages"),
        "{text}"
    );
    // A debug build says so; no progress line rewritten in place goes to a pipe.
    let err = stderr(&o);
    assert!(err.contains("debug build"), "{err}");
    assert!(!err.contains('\r'), "{err:?}");

    let o = run(&["request", "upper", "hello", "--raw"], &["--token", TOKEN]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "HELLO");

    // Bad input: exit code and one line naming what is wrong.
    let o = run(&["request", "worker", "1"], &["--token", "wrong"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("token rejected"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));

    let o = aqe(d, &["certs", "init", "other"]);
    assert!(o.status.success());
    let o = aqe(d, &["certs", "issue", "other", "stranger"]);
    assert!(o.status.success());
    let o = aqe(
        d,
        &[
            "request",
            "worker",
            "1",
            "--bootstrap",
            &addr,
            "--certs",
            "other",
            "--name",
            "stranger",
            "--token",
            TOKEN,
        ],
    );
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("untrusted certificate"),
        "{}",
        stderr(&o)
    );

    std::fs::write(d.join("bad.pem"), "not a certificate").expect("write");
    let o = aqe(
        d,
        &[
            "request",
            "worker",
            "1",
            "--bootstrap",
            &addr,
            "--cert",
            "bad.pem",
            "--key",
            "certs/cli.key",
            "--ca",
            "certs/ca.pem",
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("bad.pem: no CERTIFICATE"),
        "{}",
        stderr(&o)
    );

    // An unknown agent fails once the fleet's membership is complete, well before the
    // 10 s wait, naming the agents that are there, the closest first.
    let started = Instant::now();
    let o = run(&["request", "workr", "1"], &["--token", TOKEN]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        stderr(&o).contains("agent workr not found; known agents, closest first: worker"),
        "{}",
        stderr(&o)
    );
    // The failed command said goodbye: the same name works again at once.
    let started = Instant::now();
    let o = run(&["request", "worker", "2"], &["--token", TOKEN]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    // Without a bootstrap there is nobody to ask, and it says so at once.
    let started = Instant::now();
    let o = aqe(d, &["request", "worker", "1"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("no --bootstrap"), "{}", stderr(&o));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );

    let o = aqe(
        d,
        &[
            "request",
            "worker",
            "1",
            "--bootstrap",
            "127.0.0.1:9",
            "--certs",
            "certs",
            "--name",
            "cli",
            "--token",
            TOKEN,
            "--wait",
            "1",
        ],
    );
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("127.0.0.1:9"), "{}", stderr(&o));

    let o = aqe(d, &["certs", "issue", "missing", "x"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("missing/ca.pem"), "{}", stderr(&o));

    let o = aqe(
        d,
        &["send", "worker", "not json", "--json", "--bootstrap", &addr],
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("not JSON"), "{}", stderr(&o));

    let o = aqe(d, &["request"]);
    assert_eq!(o.status.code(), Some(2), "usage");
}

/// Two processes with one certificate, as people run many commands with one credential: two
/// endpoints (the same key, each process its own incarnation), one principal. `aqe listen` in
/// one, `aqe send` in the other, both `--name cli-b`.
#[test]
fn two_processes_with_one_certificate_work_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let o = aqe(d, &["certs", "init", "certs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = aqe(
        d,
        &["certs", "issue", "certs", "cli-b", "--ip", "127.0.0.1"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let one = ["--certs", "certs", "--name", "cli-b"];
    let mut listen = vec!["listen", "L", "--listen", "127.0.0.1:0", "--count", "9"];
    listen.extend(one);
    let (mut listener, ready, mut heard) = spawn(d, &listen, "agent L listening at ");
    let addr = ready.trim_start_matches("agent L listening at ").to_owned();
    for payload in ["first", "second"] {
        let mut send = vec!["send", "L", payload, "--raw", "--bootstrap", &addr];
        send.extend(one);
        let o = aqe(d, &send);
        assert!(
            o.status.success(),
            "send {payload}: {} (exit {:?})",
            stderr(&o),
            o.status.code()
        );
        assert!(stdout(&o).contains("to L"), "{}", stdout(&o));
        let line = next_line(&mut heard);
        assert!(
            line.ends_with(&format!("[coordination] {payload}")),
            "{line}"
        );
    }
    // Payloads from a file (`@PATH`) and from stdin (`-`), for what an argument cannot hold.
    std::fs::write(d.join("payload.txt"), "from a file").expect("payload file");
    let mut send = vec!["send", "L", "@payload.txt", "--raw", "--bootstrap", &addr];
    send.extend(one);
    let o = aqe(d, &send);
    assert!(o.status.success(), "send @file: {}", stderr(&o));
    let line = next_line(&mut heard);
    assert!(line.ends_with("[coordination] from a file"), "{line}");
    let mut send = vec!["send", "L", "-", "--raw", "--bootstrap", &addr];
    send.extend(one);
    let mut child = command(d, &send)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn aqe send -");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), b"from stdin")
        .expect("write stdin");
    let o = child.wait_with_output().expect("aqe send -");
    assert!(o.status.success(), "send -: {}", stderr(&o));
    let line = next_line(&mut heard);
    assert!(line.ends_with("[coordination] from stdin"), "{line}");
    // Joining from the environment alone.
    let o = command(d, &["send", "L", "from the environment", "--raw"])
        .env("AQE_BOOTSTRAP", &addr)
        .env("AQE_CERTS", "certs")
        .env("AQE_NAME", "cli-b")
        .output()
        .expect("aqe send");
    assert!(o.status.success(), "send from env: {}", stderr(&o));
    let line = next_line(&mut heard);
    assert!(
        line.ends_with("[coordination] from the environment"),
        "{line}"
    );
    // Unreliable messages leave before the command does: every one of these arrives.
    for n in 0..4 {
        let payload = format!("metric {n}");
        let mut send = vec![
            "send",
            "L",
            &payload,
            "--raw",
            "--channel",
            "metrics",
            "--bootstrap",
            &addr,
        ];
        send.extend(one);
        let o = aqe(d, &send);
        assert!(o.status.success(), "send on metrics: {}", stderr(&o));
        let line = next_line(&mut heard);
        assert!(line.ends_with(&format!("[metrics] {payload}")), "{line}");
    }
    let o = aqe(d, &["send", "L", "@missing.txt", "--bootstrap", &addr]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "a missing payload file: {}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("missing.txt"), "{}", stderr(&o));
    let status = listener
        .0
        .wait()
        .expect("listener exits after nine messages");
    assert!(status.success(), "{status:?}");
}

/// `--version` names the transports built in; logs piped to a file or a pipe carry no
/// colour codes, even at full verbosity.
#[test]
fn version_names_the_transports_and_piped_logs_have_no_colour() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let o = aqe(d, &["--version"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let version = stdout(&o);
    assert!(
        version.contains("joins fleets over QUIC and NATS; transports built in: QUIC, NATS"),
        "{version}"
    );
    assert!(version.trim_end().ends_with("bus)"), "{version}");
    // Completion scripts: bash's parses and knows the subcommands.
    let o = aqe(d, &["completions", "bash"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let script = stdout(&o);
    assert!(
        script.contains("_aqe()") && script.contains("request"),
        "{script}"
    );
    std::fs::write(d.join("aqe.bash"), &script).expect("script");
    let check = Command::new("bash")
        .arg("-n")
        .arg(d.join("aqe.bash"))
        .output()
        .expect("bash -n");
    assert!(check.status.success(), "{}", stderr(&check));
    for shell in ["zsh", "fish"] {
        let o = aqe(d, &["completions", shell]);
        assert!(o.status.success() && !o.stdout.is_empty(), "{shell}");
    }
    // A command that logs (debug) and fails at once: nobody listens at the bootstrap.
    let o = aqe(
        d,
        &[
            "-vv",
            "send",
            "nobody",
            "x",
            "--bootstrap",
            "127.0.0.1:9",
            "--wait",
            "1",
        ],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("DEBUG") || err.contains("INFO"),
        "it logged: {err}"
    );
    assert!(
        !err.contains('\u{1b}'),
        "no escape codes in piped stderr: {err:?}"
    );
}

/// `aqe node` in a project's root reads the agent definitions under `.claude/agents/` and
/// leaves the project's other JSON files alone; a folder with none says so.
#[test]
fn a_node_in_a_project_root_reads_only_agent_definitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let project = d.join("web");
    std::fs::create_dir_all(project.join(".claude/agents")).expect("dirs");
    std::fs::write(
        project.join("package.json"),
        r#"{"name": "web", "version": "1.0.0", "type": "module"}"#,
    )
    .expect("package.json");
    std::fs::write(
        project.join("tsconfig.json"),
        r#"{"compilerOptions": {"strict": true}}"#,
    )
    .expect("tsconfig.json");
    std::fs::write(
        project.join(".claude/agents/reviewer.json"),
        r#"{"id": "reviewer", "type": "code-reviewer"}"#,
    )
    .expect("definition");
    let (_node, line, _) = spawn(d, &["node", "web"], "agent ");
    assert_eq!(line, "agent reviewer (code-reviewer)");

    let empty = d.join("plain");
    std::fs::create_dir_all(&empty).expect("dir");
    std::fs::write(empty.join("package.json"), r#"{"name": "plain"}"#).expect("package.json");
    let o = aqe(d, &["node", "plain"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no agent definitions"),
        "{}",
        stderr(&o)
    );
}

/// A fleet over NATS alone, from the command line: a node whose definition has only a
/// natsConfig, and commands joining with `--nats` (or AQE_NATS) and `--fleet`: requests,
/// confirmed sends to a listener, an unknown agent named quickly, all as separate processes
/// through a real nats-server.
#[test]
fn a_fleet_over_nats_from_the_command_line() {
    let url = aqe_nats::testing::NatsServer::shared().url();
    let fleet = format!("cli{}", std::process::id());
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir(d.join("fleet")).expect("mkdir");
    std::fs::write(
        d.join("fleet/worker.json"),
        format!(
            r#"{{"id": "worker", "type": "executor",
                 "natsConfig": {{"servers": ["{url}"], "fleet": "{fleet}"}}}}"#
        ),
    )
    .expect("definition");
    let (_node, line, _) = spawn(d, &["node", "fleet", "--log-file", "node.log"], "agent ");
    assert_eq!(line, "agent worker (executor)");
    let over_nats = |args: &[&str]| -> Output {
        let mut c = command(d, args);
        c.args(["--fleet", &fleet]).env("AQE_NATS", &url);
        c.output().expect("run aqe")
    };

    let o = over_nats(&["request", "worker", r#"{"over":"nats"}"#]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), r#"{"over":"nats"}"#);
    let o = over_nats(&["request", "worker", r#"{"n":1}"#, "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("one JSON document");
    assert_eq!(doc["from"], "worker");
    assert_eq!(doc["encoding"], "json");
    assert_eq!(doc["payload"], serde_json::json!({"n": 1}));
    assert!(
        doc["elapsedMs"].as_f64().is_some_and(|ms| ms > 0.0),
        "{doc}"
    );
    let o = over_nats(&[
        "bench",
        "worker",
        "--requests",
        "20",
        "--messages",
        "50",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("one JSON document");
    assert_eq!(doc["requests"]["count"], 20, "{doc}");
    assert_eq!(doc["oneWay"]["count"], 50, "{doc}");
    assert_eq!(doc["oneWay"]["failed"], 0, "{doc}");
    assert!(
        doc["requests"]["p50Us"].as_f64().is_some_and(|us| us > 0.0),
        "{doc}"
    );

    // A QUIC bootstrap endpoint that does not answer: NATS carries the request.
    let o = over_nats(&[
        "request",
        "worker",
        "via NATS",
        "--bootstrap",
        "127.0.0.1:9",
        "--wait",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "via NATS");

    // What the fleet's endpoints say of themselves, asked over NATS.
    let o = over_nats(&["stats", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("one JSON document");
    let node = stats
        .as_array()
        .and_then(|a| {
            a.iter().find(|e| {
                e["report"]["agents"]
                    .as_array()
                    .is_some_and(|ags| ags.iter().any(|ag| ag["id"] == "worker"))
            })
        })
        .unwrap_or_else(|| panic!("no report names the worker: {stats}"));
    assert_eq!(node["report"]["transport"], "NATS", "{node}");
    assert!(
        node["report"]["links"]
            .as_array()
            .is_some_and(|l| !l.is_empty()),
        "{node}"
    );
    let o = over_nats(&["top", "--once"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("worker") && text.contains(" NATS listen "),
        "{text}"
    );

    // A listener and a sender, both joined over NATS with one name each.
    let mut listener = command(d, &["listen", "inbox", "--fleet", &fleet, "--nats", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn listen");
    let mut out = BufReader::new(listener.stdout.take().expect("stdout"));
    let _listener = Running(listener);
    assert_eq!(next_line(&mut out), "agent inbox listening at NATS");
    let o = over_nats(&["send", "inbox", "first"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("sent "), "{}", stdout(&o));
    assert!(next_line(&mut out).contains("first"));

    // A stream to a node's agent: every line arrives (the node logs them).
    let mut streamer = command(d, &["stream", "worker", "--fleet", &fleet, "--nats", &url])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stream");
    std::io::Write::write_all(
        streamer.stdin.as_mut().expect("stdin"),
        b"line one\nline two\n",
    )
    .expect("write");
    drop(streamer.stdin.take());
    let o = streamer.wait_with_output().expect("stream");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("streamed 2 lines"), "{}", stderr(&o));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(d.join("node.log")).unwrap_or_default();
        if log.contains("line one") && log.contains("line two") && log.contains("stream ended") {
            break;
        }
        assert!(Instant::now() < deadline, "the node logged: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A stream to an agent without a stream handler (`aqe reply`): refused at open.
    let mut replier = command(
        d,
        &["reply", "deaf", "--echo", "--fleet", &fleet, "--nats", &url],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn reply");
    let mut replier_out = BufReader::new(replier.stdout.take().expect("stdout"));
    let _replier = Running(replier);
    assert_eq!(next_line(&mut replier_out), "agent deaf answering");
    let o = command(d, &["stream", "deaf", "--fleet", &fleet, "--nats", &url])
        .stdin(Stdio::null())
        .output()
        .expect("run aqe");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("takes no streams"), "{}", stderr(&o));

    // An unknown agent: named as soon as the fleet's membership is complete.
    let started = Instant::now();
    let o = over_nats(&["request", "wroker", "x"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("worker"), "{}", stderr(&o));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    // Nothing over NATS to a fleet that does not exist there.
    let o = command(
        d,
        &[
            "request",
            "worker",
            "x",
            "--nats",
            &url,
            "--fleet",
            "elsewhere",
            "--wait",
            "2",
        ],
    )
    .output()
    .expect("run aqe");
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
}

/// A node whose NATS server is down at start serves QUIC at once and joins NATS when the
/// server comes; Ctrl-C after the server died again ends it within the stated bound.
#[test]
fn a_node_starts_without_its_nats_server_and_stops_without_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    node_and_cli_certificates(d);
    // A port no server listens on yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let fleet = format!("late{}", std::process::id());
    std::fs::create_dir(d.join("fleet")).expect("mkdir");
    std::fs::write(
        d.join("fleet/worker.json"),
        format!(
            r#"{{"id": "worker", "type": "executor", "enableQUIC": true,
                 "quicConfig": {{"host": "127.0.0.1", "port": 0,
                   "security": {{"certPath": "../certs/node.pem", "keyPath": "../certs/node.key",
                                "caPath": "../certs/ca.pem", "verifyPeer": true}}}},
                 "natsConfig": {{"servers": ["{url}"], "fleet": "{fleet}"}}}}"#
        ),
    )
    .expect("definition");
    let started = Instant::now();
    let (node, listening, _out) = spawn(d, &["node", "fleet"], "listening on ");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let addr = listening.trim_start_matches("listening on ").to_owned();
    let quic = ["--bootstrap", &addr, "--certs", "certs", "--name", "cli"];
    let o = aqe(
        d,
        &[&["request", "worker", "over QUIC"][..], &quic[..]].concat(),
    );
    assert!(
        o.status.success(),
        "QUIC while NATS is down: {}",
        stderr(&o)
    );

    // The server comes: the node joins the fleet there without being told.
    let server = aqe_nats::testing::NatsServer::start_on(port).expect("nats-server");
    let o = aqe(
        d,
        &[
            "request",
            "worker",
            "over NATS",
            "--nats",
            &url,
            "--fleet",
            &fleet,
            "--wait",
            "20",
        ],
    );
    assert!(o.status.success(), "NATS once it is up: {}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "over NATS");

    // The server goes; Ctrl-C still ends the node promptly.
    drop(server);
    std::thread::sleep(Duration::from_millis(300));
    let mut node = node;
    let child = &mut node.0;
    signal(child, "INT");
    let status = exited(child, Duration::from_secs(5), "the node, after Ctrl-C,");
    assert!(status.success(), "{status:?}");
}

/// `aqe listen` outlives its node: the node is killed and started again on the same address,
/// the listener says it lost the connection and that it is back, and a message sent through
/// the new node reaches it.
#[test]
fn a_listener_comes_back_after_its_node_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    node_and_cli_certificates(d);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port();
    std::fs::create_dir(d.join("fleet")).expect("mkdir");
    std::fs::write(
        d.join("fleet/worker.json"),
        format!(
            r#"{{"id": "worker", "type": "executor", "enableQUIC": true,
                 "quicConfig": {{"host": "127.0.0.1", "port": {port},
                   "security": {{"certPath": "../certs/node.pem", "keyPath": "../certs/node.key",
                                "caPath": "../certs/ca.pem", "verifyPeer": true}}}}}}"#
        ),
    )
    .expect("definition");
    let addr = format!("127.0.0.1:{port}");
    let join = [
        "--bootstrap",
        addr.as_str(),
        "--certs",
        "certs",
        "--name",
        "cli",
    ];
    let node = spawn(d, &["node", "fleet"], "listening on ");
    let log = d.join("listen.err");
    let mut listener = command(d, &[&["listen", "inbox"][..], &join[..]].concat())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn listen");
    let mut out = BufReader::new(listener.stdout.take().expect("stdout"));
    let _listener = Running(listener);
    assert!(next_line(&mut out).starts_with("agent inbox listening at "));
    let o = aqe(d, &[&["send", "inbox", "before"][..], &join[..]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(next_line(&mut out).ends_with("before"));

    // The node dies without a word, and comes back on the same address.
    drop(node);
    let said = |what: &str, within: Duration| {
        let deadline = Instant::now() + within;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(what) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "listen never said {what:?}: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    said(
        &format!("lost the connection to {addr}"),
        Duration::from_secs(10),
    );
    let restarted = Instant::now();
    let _node = spawn(d, &["node", "fleet"], "listening on ");
    said(
        &format!("connected to {addr} again"),
        Duration::from_secs(10),
    );
    let back = restarted.elapsed();
    let o = aqe(d, &[&["send", "inbox", "after"][..], &join[..]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(next_line(&mut out).ends_with("after"));
    assert!(back < Duration::from_secs(8), "back after {back:?}");
}

/// The guide's definition, exactly (but a free port): the node runs it, and says how to make
/// it reachable (its development certificate) and nameable (its random id).
#[test]
fn the_guides_definition_runs_with_hints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir_all(d.join(".claude/agents")).expect("dirs");
    std::fs::write(
        d.join(".claude/agents/qe-test-executor.json"),
        r#"{
  "agentType": "qe-test-executor",
  "enableQUIC": true,
  "quicConfig": {
    "host": "localhost",
    "port": 0,
    "channels": ["coordination", "results", "metrics"]
  }
}"#,
    )
    .expect("definition");
    let (_node, _listening, mut out) =
        spawn(d, &["node", ".", "--log-file", "node.log"], "listening on ");
    assert!(next_line(&mut out).starts_with("agent qe-test-executor-"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(d.join("node.log")).unwrap_or_default();
        if log.contains("development certificate") && log.contains(r#"has no "id""#) {
            assert!(log.contains("aqe certs init"), "{log}");
            break;
        }
        assert!(Instant::now() < deadline, "no hints in: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With stderr on a terminal (coloured), the `--log-file` copy stays plain text, span fields
/// included. `script` (util-linux) gives the node its terminal.
#[test]
fn a_log_file_has_no_colour_codes_even_when_stderr_has() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("agents")).expect("dir");
    std::fs::write(
        d.join("agents/w.json"),
        r#"{"id": "w", "type": "worker", "enableQUIC": true, "quicConfig": {"host": "127.0.0.1", "port": 0}}"#,
    )
    .expect("definition");
    let log = d.join("node.log");
    let out = d.join("terminal.out");
    let mut script = Command::new("script")
        .current_dir(d)
        .arg("-qfec")
        .arg(format!("{AQE} node agents --log-file {}", log.display()))
        .arg(&out)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("script (util-linux) runs the node on a terminal");
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(rest) = text.split("listening on ").nth(1) {
            break rest.split_whitespace().next().expect("address").to_owned();
        }
        assert!(Instant::now() < deadline, "the node never listened: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Refused (its certificate is a development one): the node logs a warning in its
    // endpoint's span.
    let o = aqe(
        d,
        &["request", "w", "x", "--bootstrap", &addr, "--wait", "2"],
    );
    assert!(!o.status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let logged = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("endpoint{") {
            break text;
        }
        assert!(Instant::now() < deadline, "no span in the log: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = script.kill();
    let _ = script.wait();
    assert!(
        !logged.contains('\u{1b}'),
        "colour codes in the log file: {logged:?}"
    );
    let terminal = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        terminal.contains('\u{1b}'),
        "the terminal is coloured: {terminal:?}"
    );
}

/// `aqe node --metrics`: a scrape of `/metrics` gives the node's agents' traffic and links.
#[test]
fn a_node_serves_its_metrics_for_prometheus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    node_and_cli_certificates(d);
    std::fs::create_dir(d.join("fleet")).expect("mkdir");
    std::fs::write(
        d.join("fleet/worker.json"),
        r#"{"id": "worker", "type": "qe-test-executor", "enableQUIC": true,
            "quicConfig": {"host": "127.0.0.1", "port": 0,
              "security": {"certPath": "../certs/node.pem", "keyPath": "../certs/node.key",
                           "caPath": "../certs/ca.pem", "verifyPeer": true}}}"#,
    )
    .expect("definition");
    let (_node, listening, mut out) = spawn(
        d,
        &["node", "fleet", "--metrics", "127.0.0.1:0"],
        "listening on ",
    );
    let addr = listening.trim_start_matches("listening on ").to_owned();
    let metrics_at = {
        let mut line = String::new();
        while !line.starts_with("metrics at ") {
            line = next_line(&mut out);
        }
        line
    };
    let scrape_at = metrics_at
        .trim_start_matches("metrics at http://")
        .trim_end_matches("/metrics")
        .to_owned();
    let o = aqe(
        d,
        &[
            "send",
            "worker",
            "hello",
            "--bootstrap",
            &addr,
            "--certs",
            "certs",
            "--name",
            "cli",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let scrape = || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&scrape_at).expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\n\r\n")
            .expect("write");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        body
    };
    // The message is counted once the node's handler took it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let body = scrape();
        if body.contains("aqe_messages_received_total{agent=\"worker\"} 1\n") {
            break body;
        }
        assert!(Instant::now() < deadline, "never counted:\n{body}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(body.starts_with("HTTP/1.1 200 OK\r\n"), "{body}");
    for family in [
        "# TYPE aqe_messages_sent counter",
        "# TYPE aqe_inbox_depth gauge",
        "# TYPE aqe_links gauge",
        "# TYPE aqe_link_rtt_seconds gauge",
        "aqe_messages_failed_total{agent=\"worker\"} 0\n",
    ] {
        assert!(body.contains(family), "{family} missing:\n{body}");
    }
    assert!(body.ends_with("# EOF\n"), "{body}");
}
