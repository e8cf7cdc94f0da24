//! `tagflow register`: talk to a running agent's registration socket.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use tagflow::sources::{
    client::Client,
    protocol::{Flow, Proto, Registration, Target},
};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, env = "TAGFLOW_AGENT_SOCKET", default_value = tagflow::config::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    what: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// The target's traffic carries the request's trace from now on.
    Begin(Request),
    /// Stop, if the target still carries this trace.
    End(Request),
    /// Check that the agent answers.
    Ping,
}

#[derive(clap::Args)]
struct Request {
    #[arg(long)]
    request_id: Option<String>,
    #[arg(long)]
    traceparent: Option<String>,
    /// Target process (in your network namespace).
    #[arg(long, conflicts_with = "port", required_unless_present = "port")]
    pid: Option<u32>,
    /// Target: whoever listens on this TCP port in your namespace.
    #[arg(long)]
    port: Option<u16>,
    /// Connection to tag exactly: LOCAL,REMOTE (ip:port,ip:port); repeatable.
    #[arg(long = "flow")]
    flows: Vec<String>,
}

impl Request {
    fn registration(&self) -> anyhow::Result<Registration> {
        let mut headers = BTreeMap::new();
        if let Some(r) = &self.request_id {
            headers.insert("x-request-id".to_string(), r.clone());
        }
        if let Some(t) = &self.traceparent {
            headers.insert("traceparent".to_string(), t.clone());
        }
        let target = match (self.pid, self.port) {
            (Some(pid), _) => Target::Pid(pid),
            (None, Some(port)) => Target::Port {
                port,
                proto: Proto::Tcp,
            },
            (None, None) => anyhow::bail!("give --pid or --port"),
        };
        let flows = self
            .flows
            .iter()
            .map(|f| {
                let (l, r) = f
                    .split_once(',')
                    .ok_or_else(|| anyhow::anyhow!("--flow wants LOCAL,REMOTE"))?;
                Ok(Flow {
                    proto: Proto::Tcp,
                    local: l.into(),
                    remote: r.into(),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Registration {
            headers,
            target,
            flows,
            // A registration from the shell outlives this short connection.
            release_on_close: false,
        })
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = rt.block_on(async {
        let mut c = Client::new(a.socket, Duration::from_secs(5));
        match a.what {
            Cmd::Ping => c.ping().await,
            Cmd::Begin(r) => c.begin(r.registration()?).await,
            Cmd::End(r) => c.end(r.registration()?).await,
        }
        .map_err(anyhow::Error::from)
    })?;
    println!("{}", serde_json::to_string(&reply)?);
    Ok(())
}
