//! Payloads from the command line and payloads printed to it.

use aqe_core::{Encoding, Envelope, Payload};

use crate::cli::PayloadArgs;
use crate::error::CliError;

/// The payload the arguments give: JSON when the text is JSON (or `--json`), else raw bytes.
/// `-` reads it from stdin and `@PATH` from a file (for payloads too large for an argument).
pub(crate) async fn from_args(p: &PayloadArgs) -> Result<Payload, CliError> {
    use tokio::io::AsyncReadExt;
    let bytes = if p.payload == "-" {
        let mut buf = Vec::new();
        tokio::io::stdin()
            .read_to_end(&mut buf)
            .await
            .map_err(|source| CliError::File {
                path: "-".into(),
                source,
            })?;
        buf
    } else if let Some(path) = p.payload.strip_prefix('@') {
        tokio::fs::read(path)
            .await
            .map_err(|source| CliError::File {
                path: path.into(),
                source,
            })?
    } else {
        p.payload.clone().into_bytes()
    };
    if p.raw {
        return Ok(Payload::raw(bytes));
    }
    match Payload::json_text(bytes.clone()) {
        Ok(json) => Ok(json),
        Err(e) if p.json => Err(CliError::Config(aqe_core::Error::Configuration {
            file: None,
            field: "PAYLOAD".into(),
            message: format!("not JSON ({e}); drop --json to send it as text"),
        })),
        Err(_) => Ok(Payload::raw(bytes)),
    }
}

/// The response as a JSON document: who answered, its encoding, its payload (JSON as JSON,
/// other payloads as `show` prints them) and the round trip.
pub(crate) fn document(env: &Envelope, elapsed: std::time::Duration) -> serde_json::Value {
    let payload = match env.encoding {
        Encoding::Json => env
            .decode::<serde_json::Value>()
            .unwrap_or_else(|_| serde_json::Value::String(show(env))),
        _ => serde_json::Value::String(show(env)),
    };
    serde_json::json!({
        "from": env.from.as_str(),
        "id": env.id.to_string(),
        "encoding": env.encoding.to_string().to_lowercase(),
        "payload": payload,
        "elapsedMs": elapsed.as_secs_f64() * 1000.0,
    })
}

/// The payload as a line of text: JSON as it is (compact), raw bytes as text when UTF-8
/// (else hex), postcard as its size (a typed Rust value: only its type can read it).
pub(crate) fn show(env: &Envelope) -> String {
    match env.encoding {
        Encoding::Json => match env.decode::<serde_json::Value>() {
            Ok(v) => v.to_string(),
            Err(_) => String::from_utf8_lossy(&env.payload).into_owned(),
        },
        Encoding::Raw => match std::str::from_utf8(&env.payload) {
            Ok(s) => s.to_owned(),
            Err(_) => env.payload.iter().map(|b| format!("{b:02x}")).collect(),
        },
        Encoding::Postcard => format!(
            "(postcard, {} bytes: a typed Rust value)",
            env.payload.len()
        ),
    }
}
