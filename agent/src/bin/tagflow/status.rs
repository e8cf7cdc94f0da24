//! `tagflow status`: a running agent's attachments, map fill and losses.
use std::net::SocketAddr;

#[derive(clap::Args)]
pub struct Args {
    /// The agent's metrics address.
    #[arg(long, env = "TAGFLOW_METRICS_ADDR", default_value = tagflow::config::DEFAULT_METRICS_ADDR)]
    addr: SocketAddr,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let s = rt
        .block_on(tagflow::ops_http::fetch_status(a.addr))
        .map_err(anyhow::Error::msg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", tagflow::metrics::format_status(&s));
    }
    Ok(())
}
