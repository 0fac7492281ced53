//! The command line.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Run and use a fleet of aqe agents: certificates, nodes, and agents from the command line.
#[derive(Debug, Parser)]
#[command(name = "aqe", version, about, long_about = None)]
pub(crate) struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Certificates for a fleet: a CA, and node certificates it signs.
    #[command(subcommand)]
    Certs(Certs),
    /// Runs the agents of a folder of definition files until Ctrl-C.
    Node(NodeArgs),
    /// Sends one message to an agent.
    #[command(
        after_help = "Examples:\n  aqe send worker '{\"task\":\"lint\"}' --bootstrap 10.0.0.1:9000 --certs certs --name cli\n  aqe send worker hello --raw --bootstrap 127.0.0.1:9000"
    )]
    Send(SendArgs),
    /// Sends a request to an agent and prints the response.
    #[command(
        after_help = "Example:\n  aqe request worker '{\"threshold\":80}' --bootstrap 10.0.0.1:9000 --certs certs --name cli"
    )]
    Request(RequestArgs),
    /// Sends one message to every agent of the fleet on a broadcast channel.
    Broadcast(BroadcastArgs),
    /// Joins the fleet as an agent that answers requests (echo, or a command's output).
    #[command(
        after_help = "Examples:\n  aqe reply worker --echo --bootstrap 127.0.0.1:9000\n  aqe reply upper --command 'tr a-z A-Z' --bootstrap 127.0.0.1:9000"
    )]
    Reply(ReplyArgs),
    /// Hosts one agent whose behaviour is a program speaking JSON lines (BRIDGE.md): the
    /// caller on stdin/stdout, or a child (`-- CMD ARGS`). Agents in any language.
    #[command(
        after_help = "Examples:\n  aqe agent py --bootstrap 127.0.0.1:9000 -- python3 agent.py\n  echo '{\"op\":\"discover\"}' | aqe agent probe --bootstrap 127.0.0.1:9000"
    )]
    Agent(AgentArgs),
    /// Joins the fleet as an agent that prints what it receives.
    Listen(ListenArgs),
    /// Lists the agents of the fleet.
    Peers(PeersArgs),
    /// Opens a stream to an agent and writes each line of standard input to it.
    #[command(
        after_help = "Example:\n  tail -f app.log | aqe stream collector --bootstrap 10.0.0.1:9000 --certs certs --name cli"
    )]
    Stream(StreamArgs),
    /// Measures request/response latency and one-way throughput to an agent (one that
    /// answers requests: `aqe reply AGENT --echo`, or an `aqe node` agent).
    #[command(
        after_help = "Example:\n  aqe bench worker --requests 10000 --concurrency 8 --bootstrap 10.0.0.1:9000 --certs certs --name cli"
    )]
    Bench(BenchArgs),
    /// Statistics of every endpoint of the fleet: links (RTT, congestion window, loss) and
    /// agents (messages, bytes, RTT).
    #[command(
        after_help = "Example:\n  aqe stats --bootstrap 10.0.0.1:9000 --certs certs --name cli"
    )]
    Stats(InspectArgs),
    /// Health of every agent of the fleet (healthy, degraded, unhealthy, and why).
    Health(InspectArgs),
    /// A live table of the fleet's endpoints and agents, refreshed every interval.
    #[command(
        after_help = "Examples:\n  aqe top --bootstrap 10.0.0.1:9000 --certs certs --name cli\n  aqe top --once --bootstrap 127.0.0.1:9000"
    )]
    Top(TopArgs),
    /// Named sets of joining options, as `nats context`: `add`, `select`, `ls`, `show`, `rm`.
    #[command(
        subcommand,
        after_help = "Examples:\n  aqe context add lab --bootstrap 10.0.0.1:9000 --certs certs --name cli-b --token s3cret\n  aqe context select lab\n  aqe request worker '{\"task\":\"lint\"}'   # joins as the context says"
    )]
    Context(ContextCmd),
    /// Prints a shell completion script: `aqe completions bash > /etc/bash_completion.d/aqe`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ContextCmd {
    /// Saves the joining options given as context NAME (its token too: the file is
    /// readable by its owner only).
    Add {
        /// The context's name.
        #[arg(value_name = "NAME")]
        label: String,
        #[command(flatten)]
        join: Box<Join>,
    },
    /// Makes NAME the context commands join with when they name none.
    Select {
        /// The context's name.
        name: String,
    },
    /// Lists the contexts; the selected one is marked `*`.
    Ls,
    /// Prints a context (the selected one by default), its token hidden.
    Show {
        /// The context's name.
        name: Option<String>,
    },
    /// Removes a context.
    Rm {
        /// The context's name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// Wait until this many other endpoints are known.
    #[arg(long, default_value = "1")]
    pub(crate) min_endpoints: usize,
    /// How to print: a table, or JSON (one document; `top` prints one per frame, a line each).
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) format: Format,
    #[command(flatten)]
    pub(crate) join: Join,
}

#[derive(Debug, Args)]
pub(crate) struct TopArgs {
    /// Print one frame and exit.
    #[arg(long)]
    pub(crate) once: bool,
    /// Seconds between frames.
    #[arg(long, default_value = "1", value_parser = seconds)]
    pub(crate) interval: Duration,
    #[command(flatten)]
    pub(crate) inspect: InspectArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Certs {
    /// Creates a fleet CA in DIR: ca.pem (give it to every node) and ca.key (keep it safe).
    #[command(after_help = "Example:\n  aqe certs init certs")]
    Init {
        /// Where to write ca.pem and ca.key.
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "aqe fleet CA")]
        name: String,
        /// Replace a CA already there.
        #[arg(long)]
        force: bool,
    },
    /// Issues a node certificate signed by DIR's CA: DIR/NAME.pem and DIR/NAME.key.
    #[command(
        after_help = "Example:\n  aqe certs issue certs node-a --ip 10.0.0.1 --dns node-a.example"
    )]
    Issue {
        /// The folder holding ca.pem and ca.key.
        dir: PathBuf,
        /// The node's name (the files' names, and the certificate's common name).
        name: String,
        /// IP addresses the node is dialed at.
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// DNS names the node is dialed at.
        #[arg(long)]
        dns: Vec<String>,
        /// The name peers verify (their `serverName`).
        #[arg(long, default_value = "localhost")]
        server_name: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct NodeArgs {
    /// A folder of agent definitions (*.json, *.jsonc; or a project with .claude/agents/).
    pub(crate) dir: PathBuf,
    /// Also write the log to this file.
    #[arg(long)]
    pub(crate) log_file: Option<PathBuf>,
    /// Serve metrics for Prometheus at http://ADDR/metrics (host:port; port 0: any free).
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics: Option<std::net::SocketAddr>,
}

/// How to join a fleet.
#[derive(Debug, Args, Clone)]
pub(crate) struct Join {
    /// An endpoint of the fleet to connect to (host:port); repeatable, or several in
    /// AQE_BOOTSTRAP separated by commas.
    #[arg(long, short = 'b', env = "AQE_BOOTSTRAP", value_delimiter = ',')]
    pub(crate) bootstrap: Vec<String>,
    /// Join as a definition file describes (its quicConfig: certificates, token, port; its
    /// natsConfig; its chain).
    #[arg(long, conflicts_with_all = ["certs", "cert", "key", "ca"])]
    pub(crate) definition: Option<PathBuf>,
    /// Join over NATS too, through this server (nats://host:port); repeatable, or several
    /// in AQE_NATS separated by commas. With --bootstrap too: QUIC first, then NATS.
    #[arg(long, env = "AQE_NATS", value_delimiter = ',')]
    pub(crate) nats: Vec<String>,
    /// The fleet's name on the NATS server (natsConfig.fleet; default `default`).
    #[arg(long, env = "AQE_FLEET")]
    pub(crate) fleet: Option<String>,
    /// Join with the options of this saved context (see `aqe context`); options given here
    /// or in the environment win. Without it, the selected context, if any.
    #[arg(long, env = "AQE_CONTEXT")]
    pub(crate) context: Option<String>,
    /// A folder made by `aqe certs`: uses ca.pem, NAME.pem and NAME.key (with --name).
    #[arg(long, requires = "name", env = "AQE_CERTS")]
    pub(crate) certs: Option<PathBuf>,
    /// The node certificate's name in --certs.
    #[arg(long, env = "AQE_NAME")]
    pub(crate) name: Option<String>,
    /// This endpoint's certificate (PEM).
    #[arg(long, requires_all = ["key", "ca"])]
    pub(crate) cert: Option<PathBuf>,
    /// Its private key (PKCS#8 PEM).
    #[arg(long)]
    pub(crate) key: Option<PathBuf>,
    /// The fleet's CA certificate (PEM).
    #[arg(long)]
    pub(crate) ca: Option<PathBuf>,
    /// Check that the certificate of the endpoint dialed names the IP address dialed
    /// (`aqe certs issue --ip`), not only the fleet's server name.
    #[arg(long)]
    pub(crate) check_address: bool,
    /// The fleet's shared token (or AQE_TOKEN).
    #[arg(long, env = "AQE_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// The address to listen on (host:port).
    #[arg(long, default_value = "0.0.0.0:0")]
    pub(crate) listen: String,
    /// How long to wait for the fleet and the agent named (seconds).
    #[arg(long, default_value = "10", value_parser = seconds)]
    pub(crate) wait: Duration,
}

/// How to read a payload given on the command line.
#[derive(Debug, Args, Clone)]
pub(crate) struct PayloadArgs {
    /// The payload: JSON, or text (sent as raw bytes when it is not JSON); `-` reads it
    /// from stdin, `@PATH` from a file (text that starts with `@` goes through stdin).
    pub(crate) payload: String,
    /// Send it as raw bytes even if it is JSON.
    #[arg(long, conflicts_with = "json")]
    pub(crate) raw: bool,
    /// Require it to be JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct SendArgs {
    /// The receiving agent's id.
    pub(crate) to: String,
    #[command(flatten)]
    pub(crate) payload: PayloadArgs,
    /// The channel.
    #[arg(long, default_value = "coordination")]
    pub(crate) channel: String,
    #[command(flatten)]
    pub(crate) join: Join,
}

#[derive(Debug, Args)]
pub(crate) struct RequestArgs {
    /// The answering agent's id.
    pub(crate) to: String,
    #[command(flatten)]
    pub(crate) payload: PayloadArgs,
    /// How long to wait for the response (seconds).
    #[arg(long, default_value = "5", value_parser = seconds)]
    pub(crate) timeout: Duration,
    /// Attempts after a timeout or an unreachable peer.
    #[arg(long, default_value = "0")]
    pub(crate) retries: u32,
    /// `text`: the response's payload; `json`: a document with the responder, the
    /// encoding, the payload and the round trip.
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) format: Format,
    #[command(flatten)]
    pub(crate) join: Join,
}

#[derive(Debug, Args)]
pub(crate) struct BroadcastArgs {
    #[command(flatten)]
    pub(crate) payload: PayloadArgs,
    /// The (broadcast) channel.
    #[arg(long, default_value = "coordination")]
    pub(crate) channel: String,
    /// Wait until this many agents are known before sending.
    #[arg(long, default_value = "1")]
    pub(crate) min_peers: usize,
    /// Wait until each recipient has taken it (or it failed for them), and say which.
    #[arg(long)]
    pub(crate) confirm: bool,
    #[command(flatten)]
    pub(crate) join: Join,
}

#[derive(Debug, Args)]
pub(crate) struct ReplyArgs {
    /// The id this agent takes.
    pub(crate) agent: String,
    /// Answer each request with its own payload.
    #[arg(long, conflicts_with = "command")]
    pub(crate) echo: bool,
    /// Answer with this shell command's output, the request's payload on its stdin.
    #[arg(long)]
    pub(crate) command: Option<String>,
    /// The agent's type.
    #[arg(long, default_value = "cli")]
    pub(crate) agent_type: String,
    /// Stop after this many requests.
    #[arg(long)]
    pub(crate) count: Option<u64>,
    #[command(flatten)]
    pub(crate) join: Join,
}

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// The id this agent takes.
    pub(crate) agent: String,
    /// The agent's type.
    #[arg(long = "type", default_value = "bridge")]
    pub(crate) agent_type: String,
    /// A capability the agent announces (repeatable).
    #[arg(long = "capability")]
    pub(crate) capabilities: Vec<String>,
    /// Items the agent's inbox holds before senders wait (or its channels drop).
    #[arg(long, default_value = "1024")]
    pub(crate) inbox: usize,
    /// The longest line the program may write, in bytes (longer ones are skipped).
    #[arg(long, default_value = "16777216")]
    pub(crate) max_line: usize,
    #[command(flatten)]
    pub(crate) join: Join,
    /// The program that speaks for the agent, and its arguments (after `--`).
    #[arg(last = true)]
    pub(crate) program: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ListenArgs {
    /// The id this agent takes.
    pub(crate) agent: String,
    /// The agent's type.
    #[arg(long, default_value = "cli")]
    pub(crate) agent_type: String,
    /// Stop after this many messages.
    #[arg(long)]
    pub(crate) count: Option<u64>,
    #[command(flatten)]
    pub(crate) join: Join,
}

#[derive(Debug, Args)]
pub(crate) struct StreamArgs {
    /// The receiving agent's id.
    pub(crate) to: String,
    /// The channel.
    #[arg(long, default_value = "coordination")]
    pub(crate) channel: String,
    #[command(flatten)]
    pub(crate) join: Join,
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// The agent to measure against.
    pub(crate) to: String,
    /// Requests to time.
    #[arg(long, default_value = "2000")]
    pub(crate) requests: u64,
    /// Requests in flight at once.
    #[arg(long, default_value = "1")]
    pub(crate) concurrency: usize,
    /// One-way messages to send for the throughput figure (0: none).
    #[arg(long, default_value = "10000")]
    pub(crate) messages: u64,
    /// Payload bytes per request and message.
    #[arg(long, default_value = "64")]
    pub(crate) size: usize,
    /// The channel.
    #[arg(long, default_value = "coordination")]
    pub(crate) channel: String,
    /// `text`: two summary lines; `json`: one document with every figure.
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) format: Format,
    #[command(flatten)]
    pub(crate) join: Join,
}

#[derive(Debug, Args)]
pub(crate) struct PeersArgs {
    /// Wait until this many agents are known.
    #[arg(long, default_value = "1")]
    pub(crate) min_peers: usize,
    /// How to print: a table, or one JSON document (an array of peers).
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) format: Format,
    #[command(flatten)]
    pub(crate) join: Join,
}

/// How a command prints what it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Tab-separated lines with a header, or a table.
    Text,
    /// JSON, for scripts.
    Json,
}

fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{s} seconds is out of range (0 to 86400)"));
    }
    Ok(Duration::from_secs_f64(secs))
}
