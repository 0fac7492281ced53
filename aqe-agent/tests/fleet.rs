//! Starting agents from a directory of definition files.

use std::sync::Arc;

use aqe_agent::{EventBus, Fleet, HandlerError};
use aqe_core::{Error, RequestOptions, Transport};

fn write(dir: &std::path::Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write definition");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_starts_from_definitions_with_handlers_by_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "01-commander.json",
        r#"{"id":"commander","agentType":"commander"}"#,
    );
    write(
        dir.path(),
        "02-executor.json",
        r#"{"id":"executor-1","agentType":"test-executor","capabilities":["unit-tests"],"enableQUIC":true,"quicConfig":{"channels":["coordination","results"]}}"#,
    );
    write(
        dir.path(),
        "03-executor.json",
        r#"{"id":"executor-2","agentType":"test-executor","quicConfig":{"channels":["coordination","results"]}}"#,
    );
    write(dir.path(), "README.txt", "not a definition");
    let bus = Arc::new(EventBus::new());
    let fleet = Fleet::from_dir(dir.path(), bus.clone(), |def, builder| {
        if def.agent_type.as_str() == "test-executor" {
            builder.on_request(|agent, _req| async move {
                Ok::<_, HandlerError>(agent.id().to_string())
            })
        } else {
            builder
        }
    })
    .await
    .expect("fleet");
    let ids: Vec<_> = fleet.agents().iter().map(|a| a.id().to_string()).collect();
    assert_eq!(ids, ["commander", "executor-1", "executor-2"]);
    let commander = fleet.get(&"commander".into()).expect("commander");
    let executor = fleet.get(&"executor-1".into()).expect("executor");
    assert_eq!(executor.registration().channels.len(), 2);
    let answer: String = commander
        .request_from_agent(executor.id(), &(), RequestOptions::default())
        .await
        .expect("answer");
    assert_eq!(answer, "executor-1");
    fleet.shutdown().await;
    assert!(bus.peers().is_empty(), "every agent left the bus");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_definition_names_its_file_and_field_and_starts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "a.json",
        r#"{"id":"fine","agentType":"worker"}"#,
    );
    write(
        dir.path(),
        "b.json",
        r#"{"agentType":"worker","quicConfig":{"channels":[{"name":"x","type":"sideways"}]}}"#,
    );
    let bus = Arc::new(EventBus::new());
    let err = Fleet::from_dir(dir.path(), bus.clone(), |_, b| b)
        .await
        .expect_err("bad file");
    match err {
        Error::Configuration {
            file,
            field,
            message,
        } => {
            assert_eq!(file.as_deref(), Some(dir.path().join("b.json").as_path()));
            assert_eq!(field, "quicConfig.channels[0].type");
            assert!(message.contains("sideways"), "{message}");
        }
        other => panic!("{other}"),
    }
    assert!(
        bus.peers().is_empty(),
        "the agent started from a.json was shut down again"
    );
    let err = Fleet::from_dir(dir.path().join("missing"), bus, |_, b| b)
        .await
        .expect_err("no dir");
    assert!(
        matches!(err, Error::Configuration { ref field, .. } if field == "(directory)"),
        "{err}"
    );
}

/// Definition files as people write them, laid out as the guide's: under `.claude/agents/`,
/// with comments, trailing commas and `type`; a JSON syntax error names file, line and column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_as_users_write_them() {
    let project = tempfile::tempdir().expect("tempdir");
    let agents = project.path().join(".claude").join("agents");
    std::fs::create_dir_all(&agents).expect("mkdir");
    write(
        &agents,
        "executor.json",
        r#"{
  // a test executor, as in the guide
  "id": "executor",
  "type": "qe-test-executor", /* `type` is `agentType` */
  "capabilities": ["unit-tests",],
}"#,
    );
    let bus = Arc::new(EventBus::new());
    let fleet = Fleet::from_dir(project.path(), bus.clone(), |_, b| b)
        .await
        .expect("fleet from the project folder");
    let executor = fleet.get(&"executor".into()).expect("executor");
    assert_eq!(
        executor.registration().agent_type.as_str(),
        "qe-test-executor"
    );
    fleet.shutdown().await;

    write(
        &agents,
        "executor.json",
        "{\n  // fine so far\n  \"type\": \"x\"\n  \"id\": \"y\"\n}",
    );
    match Fleet::from_dir(project.path(), bus, |_, b| b).await {
        Err(Error::Configuration { file, message, .. }) => {
            assert_eq!(
                file.as_deref(),
                Some(agents.join("executor.json").as_path())
            );
            assert!(message.contains("line 4"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

/// Certificate paths in a definition are relative to the file, wherever the process runs.
#[cfg(feature = "quic")]
#[test]
fn relative_paths_are_relative_to_the_definition_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("node.jsonc");
    let def = aqe_agent::AgentDefinition::from_json(
        r#"{ "type": "node", "enableQUIC": true,
             "quicConfig": { "security": { "certPath": "certs/node.pem",
                                           "keyPath": "certs/node.key",
                                           "caPath": "/etc/fleet/ca.pem" } } }"#,
        Some(&file),
    )
    .expect("definition");
    let s = &def
        .config::<aqe_agent::aqe_quic::QuicConfig>()
        .expect("QUIC options")
        .security;
    assert_eq!(
        s.cert_path.as_deref(),
        Some(dir.path().join("certs/node.pem").as_path())
    );
    assert_eq!(
        s.key_path.as_deref(),
        Some(dir.path().join("certs/node.key").as_path())
    );
    assert_eq!(
        s.ca_path.as_deref(),
        Some(std::path::Path::new("/etc/fleet/ca.pem"))
    );
}
