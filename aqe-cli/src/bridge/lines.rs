//! The bridge's JSON lines (BRIDGE.md): reading bounded lines, commands in, events out,
//! payloads in their three forms, and the error codes.

use aqe_core::{Encoding, Envelope, Error, Payload, TraceParent};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// One line read from the program.
pub(crate) enum Line {
    /// A whole line (without its `\n`).
    Full,
    /// A line longer than the limit: skipped, never held.
    TooLong,
    /// The input ended.
    Eof,
}

/// Reads the next line into `buf` (cleared first), holding at most `max` bytes of it.
pub(crate) async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            // A last line without `\n` still counts.
            return Ok(if too_long {
                Line::TooLong
            } else if buf.is_empty() {
                Line::Eof
            } else {
                Line::Full
            });
        }
        let (part, end) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        if !too_long && buf.len() + part.len() <= max {
            buf.extend_from_slice(part);
        } else {
            too_long = true;
            buf.clear();
        }
        let used = end.unwrap_or(chunk.len());
        r.consume(used);
        if end.is_some() {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(if too_long { Line::TooLong } else { Line::Full });
        }
    }
}

/// A command that could not be carried out: its code (BRIDGE.md, "Error codes") and why.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) reason: Option<Value>,
}

/// Every error code, as BRIDGE.md's table lists them (a test holds the two together).
pub(crate) const CODES: &[&str] = &[
    "badLine",
    "lineTooLong",
    "unknownOp",
    "badField",
    "notFound",
    "busy",
    "timeout",
    "deliveryFailed",
    "remote",
    "invalid",
    "stream",
    "unknownRequest",
    "unreachable",
    "security",
    "unsupported",
    "shutdown",
    "failed",
];

impl Failure {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Self {
        debug_assert!(CODES.contains(&code), "{code} is not in BRIDGE.md");
        Self {
            code,
            message: message.into(),
            reason: None,
        }
    }

    fn field(message: impl Into<String>) -> Self {
        Self::new("badField", message)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Self::of(&e)
    }
}

impl Failure {
    /// The failure an error of the agent stands for.
    pub(crate) fn of(e: &Error) -> Self {
        let code = match e {
            Error::PeerNotFound { .. } => "notFound",
            Error::Busy { .. }
            | Error::SendFailed {
                reason: aqe_core::SendFailure::QueueFull(_),
                ..
            } => "busy",
            Error::Timeout { .. } => "timeout",
            Error::DeliveryFailed { .. } => "deliveryFailed",
            Error::Remote { .. } => "remote",
            Error::ChannelNotFound { .. }
            | Error::WrongChannelKind { .. }
            | Error::MessageTooLarge { .. }
            | Error::Configuration { .. } => "invalid",
            Error::Stream { .. } => "stream",
            Error::ConnectionFailed { .. }
            | Error::ConnectionTimeout { .. }
            | Error::ConnectionLost { .. } => "unreachable",
            Error::Security { .. } => "security",
            Error::Unsupported { .. } => "unsupported",
            Error::Shutdown => "shutdown",
            _ => "failed",
        };
        let reason = match e {
            Error::DeliveryFailed { reason, .. } => Some(reason_name(*reason)),
            _ => None,
        };
        Self {
            code,
            message: e.to_string(),
            reason,
        }
    }
}

/// A delivery failure's name in events (camelCase, as the enum's variant).
pub(crate) fn reason_name(r: aqe_core::DeliveryFailure) -> Value {
    let name = format!("{r:?}");
    let mut c = name.chars();
    let first = c.next().map(|f| f.to_ascii_lowercase()).unwrap_or_default();
    Value::String(std::iter::once(first).chain(c).collect())
}

/// The `error` event answering a command (or a line) with `reference`.
pub(crate) fn error(reference: &Value, op: Option<&str>, f: &Failure) -> Value {
    let mut e = json!({
        "type": "error",
        "ref": reference,
        "code": f.code,
        "message": f.message,
    });
    if let Some(op) = op {
        e["op"] = json!(op);
    }
    if let Some(r) = &f.reason {
        e["reason"] = r.clone();
    }
    e
}

/// The `ok` event answering `reference`, with `fields` beside it.
pub(crate) fn ok(reference: &Value, fields: Value) -> Value {
    let mut e = json!({"type": "ok", "ref": reference});
    if let (Some(e), Value::Object(fields)) = (e.as_object_mut(), fields) {
        e.extend(fields);
    }
    e
}

/// A command line, parsed as far as its `op` and `ref`.
pub(crate) struct Command {
    pub(crate) op: String,
    pub(crate) reference: Value,
    pub(crate) body: Value,
}

/// Parses one line: `Err` carries the `ref` (when the line got that far) and the failure.
pub(crate) fn command(line: &[u8]) -> Result<Command, (Value, Failure)> {
    let text = std::str::from_utf8(line).map_err(|e| {
        (
            Value::Null,
            Failure::new("badLine", format!("not UTF-8: {e}")),
        )
    })?;
    let body: Value = serde_json::from_str(text)
        .map_err(|e| (Value::Null, Failure::new("badLine", e.to_string())))?;
    let Value::Object(map) = &body else {
        return Err((
            Value::Null,
            Failure::new("badLine", "a command is a JSON object"),
        ));
    };
    let reference = map.get("ref").cloned().unwrap_or(Value::Null);
    let op = match map.get("op") {
        Some(Value::String(op)) => op.clone(),
        _ => {
            return Err((
                reference,
                Failure::new(
                    "unknownOp",
                    "a command names its op (\"op\": \"send\", ...)",
                ),
            ));
        }
    };
    Ok(Command {
        op,
        reference,
        body,
    })
}

/// The command's fields as `T`.
pub(crate) fn fields<T: for<'de> Deserialize<'de>>(body: &Value) -> Result<T, Failure> {
    T::deserialize(body).map_err(|e| Failure::field(e.to_string()))
}

/// The payload a command gives: `payload` (JSON), `text` or `base64` (raw bytes); none is
/// JSON `null`.
pub(crate) fn payload(body: &Value) -> Result<Payload, Failure> {
    let given: Vec<&str> = ["payload", "text", "base64"]
        .into_iter()
        .filter(|k| body.get(*k).is_some())
        .collect();
    if given.len() > 1 {
        return Err(Failure::field(format!(
            "give one of payload, text, base64 (not {})",
            given.join(" and ")
        )));
    }
    match given.first().copied() {
        None => Payload::json(&Value::Null).map_err(Failure::from),
        Some("payload") => Payload::json(&body["payload"]).map_err(Failure::from),
        Some(k) => raw(body, k).map(Payload::raw),
    }
}

/// Stream data: `text` or `base64` (none: no bytes).
pub(crate) fn data(body: &Value) -> Result<Vec<u8>, Failure> {
    match (body.get("text"), body.get("base64")) {
        (Some(_), Some(_)) => Err(Failure::field("give text or base64, not both")),
        (Some(_), None) => raw(body, "text"),
        (None, Some(_)) => raw(body, "base64"),
        (None, None) => Ok(Vec::new()),
    }
}

fn raw(body: &Value, key: &str) -> Result<Vec<u8>, Failure> {
    let Some(s) = body[key].as_str() else {
        return Err(Failure::field(format!("{key} is a string")));
    };
    if key == "text" {
        return Ok(s.as_bytes().to_vec());
    }
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| Failure::field(format!("base64: {e}")))
}

/// The optional `trace` of a command.
pub(crate) fn trace(body: &Value) -> Result<Option<TraceParent>, Failure> {
    match body.get("trace") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|e| Failure::field(format!("trace: {e}"))),
        Some(_) => Err(Failure::field("trace is a traceparent string")),
    }
}

/// Sets an event's payload field from an envelope: `payload`, `text` or `base64`.
pub(crate) fn put_payload(event: &mut Value, env: &Envelope) {
    match env.encoding {
        Encoding::Json => match serde_json::from_slice::<Value>(&env.payload) {
            Ok(v) => event["payload"] = v,
            Err(_) => put_bytes(event, &env.payload),
        },
        Encoding::Raw => put_bytes(event, &env.payload),
        Encoding::Postcard => {
            event["base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&env.payload));
            event["encoding"] = json!("postcard");
        }
    }
}

/// Sets `text` (UTF-8) or `base64`.
pub(crate) fn put_bytes(event: &mut Value, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => event["text"] = json!(s),
        Err(_) => event["base64"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
    }
}

/// A `message` or `request` event for an envelope.
pub(crate) fn inbound(kind: &str, env: &Envelope) -> Value {
    let mut e = json!({
        "type": kind,
        "id": env.id.to_string(),
        "from": env.from.as_str(),
        "channel": env.channel.as_str(),
        "trace": env.trace.as_ref().map(|t| t.to_string()),
    });
    if kind == "message" {
        e["redelivered"] = json!(env.redelivered);
    }
    put_payload(&mut e, env);
    e
}

/// A peer as `discover` and `peerJoined` show it.
pub(crate) fn peer(p: &aqe_core::PeerInfo) -> Value {
    json!({
        "id": p.id.as_str(),
        "agentType": p.agent_type.as_str(),
        "capabilities": p.capabilities.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        "channels": p.channels.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        "state": format!("{:?}", p.state).to_lowercase(),
        "metadata": p.metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<Result<String, &'static str>> {
        let mut r = tokio::io::BufReader::with_capacity(4, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            match read_line(&mut r, &mut buf, max).await.expect("read") {
                Line::Full => out.push(Ok(String::from_utf8(buf.clone()).expect("utf8"))),
                Line::TooLong => out.push(Err("too long")),
                Line::Eof => return out,
            }
        }
    }

    #[tokio::test]
    async fn lines_are_bounded_and_a_long_one_is_skipped_whole() {
        let got = lines(b"{\"a\":1}\r\nxxxxxxxxxxxxxxxxxxxx\nok\nlast", 10).await;
        assert_eq!(
            got,
            [
                Ok("{\"a\":1}".to_owned()),
                Err("too long"),
                Ok("ok".to_owned()),
                Ok("last".to_owned())
            ]
        );
    }

    #[test]
    fn a_command_gives_at_most_one_payload_and_bad_ones_say_why() {
        let c = command(br#"{"op":"send","ref":7,"to":"b","text":"hi"}"#).expect("parse");
        assert_eq!((c.op.as_str(), c.reference.clone()), ("send", json!(7)));
        let p = payload(&c.body).expect("payload");
        assert_eq!((p.encoding, &p.bytes[..]), (Encoding::Raw, &b"hi"[..]));
        let p = payload(&json!({"payload": {"n": 1}})).expect("json");
        assert_eq!(
            (p.encoding, &p.bytes[..]),
            (Encoding::Json, &br#"{"n":1}"#[..])
        );
        let p = payload(&json!({"base64": "AAEC"})).expect("base64");
        assert_eq!(&p.bytes[..], &[0, 1, 2]);
        assert_eq!(
            payload(&json!({"text": "a", "base64": "AA=="}))
                .err()
                .map(|f| f.code),
            Some("badField")
        );
        assert_eq!(
            payload(&json!({"base64": "!"})).err().map(|f| f.code),
            Some("badField")
        );
        assert_eq!(
            command(b"not json").err().map(|e| e.1.code),
            Some("badLine")
        );
        assert_eq!(command(b"[1]").err().map(|e| e.1.code), Some("badLine"));
        let (r, f) = command(br#"{"ref":"x"}"#).err().expect("no op");
        assert_eq!((r, f.code), (json!("x"), "unknownOp"));
        assert_eq!(
            trace(&json!({"trace": "00-zz"})).err().map(|f| f.code),
            Some("badField")
        );
    }

    #[test]
    fn the_error_codes_are_bridge_md_s() {
        let doc = include_str!("../../../BRIDGE.md");
        let table = doc
            .split("### Error codes")
            .nth(1)
            .and_then(|t| t.split("\n\n").nth(1))
            .expect("BRIDGE.md has an error code table");
        let listed: Vec<&str> = table
            .lines()
            .skip(2)
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
            .collect();
        assert_eq!(listed, CODES);
    }

    #[test]
    fn delivery_failure_reasons_are_named_as_bridge_md_lists_them() {
        use aqe_core::DeliveryFailure as D;
        let names: Vec<Value> = [
            D::ReceiverStopped,
            D::Unreachable,
            D::Unconfirmed,
            D::Refused,
            D::Expired,
            D::Dropped,
        ]
        .into_iter()
        .map(reason_name)
        .collect();
        let doc = include_str!("../../../BRIDGE.md");
        for n in &names {
            let n = n.as_str().expect("a name");
            assert!(doc.contains(&format!("`{n}`")), "BRIDGE.md lists {n}");
        }
    }
}
