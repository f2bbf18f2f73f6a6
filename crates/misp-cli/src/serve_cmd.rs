//! `misp serve`: a LLaVA or Qwen2.5-VL checkpoint (+ adapter) behind an OpenAI-compatible chat API (the
//! server is `misp::serve`).

use std::net::TcpListener;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use misp::data::paths::DatasetRoot;
use misp::serve::{ServeConfig, Server};

use crate::score_cmd::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model name /v1/models lists and replies carry (default: the checkpoint folder's
    /// name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests waiting for the model at most; more are refused with 503.
    #[arg(long, default_value_t = 64)]
    queue_size: usize,
    /// With no decode running, a batch stays open this many milliseconds after its latest
    /// request arrived (and while requests are being prepared), up to --batch-size requests;
    /// while one runs, what is queued joins it (up to --batch-size rows in all).
    #[arg(long, default_value_t = 5)]
    batch_wait_ms: u64,
    /// Request bodies over this many MiB are refused with 413.
    #[arg(long, default_value_t = 32)]
    max_body_mb: usize,
    /// Answer length when a request gives no max_tokens.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// max_tokens of a request is capped at this.
    #[arg(long, default_value_t = 2048)]
    max_tokens_limit: usize,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let m = &args.model;
    m.runtime.apply()?;
    let image_root = m.image_root.as_deref().map(DatasetRoot::new).transpose()?;
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        m.model
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "misp".into())
    });
    let vlm = m.load()?;
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    let config = ServeConfig {
        model_name: name.clone(),
        queue_size: args.queue_size,
        max_batch: m.batch_size.max(1),
        batch_wait: Duration::from_millis(args.batch_wait_ms),
        max_body: args.max_body_mb * 1024 * 1024,
        default_max_tokens: args.default_max_tokens,
        max_tokens_limit: args.max_tokens_limit,
        image_root,
    };
    // One line on stdout, flushed, so a script (or a test) can wait for it and read the port.
    println!(
        "misp serve: {name} on http://{addr}/v1 (up to {} rows decoding at once)",
        m.batch_size
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    Server::new(vlm, config).run(listener)?;
    Ok(())
}
