//! `misp`: the command line of MISP-DPO. One sub-command per pipeline stage (docs/design.md §1):
//! `embed -> sae -> mine -> train -> eval`, plus `score`, `world`, `demo` and `bench`.
//!
//! This crate only parses arguments, resolves configs and calls the `misp` library; it holds no
//! method code.

mod bench_conformance;
mod bench_gemm;
mod bench_memory;
mod bench_mine;
mod bench_model;
mod demo_cmd;
mod embed_cmd;
mod eval_amber;
mod eval_cmd;
mod eval_hallusionbench;
mod eval_judged_cmd;
mod eval_mmvp;
mod eval_native;
mod malloc;
mod mine_cmd;
mod pretrain_cmd;
mod runtime;
mod sae_cmd;
mod score_cmd;
mod serve_cmd;
mod train_cmd;
mod world_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "misp",
    version,
    about = "MISP-DPO: align vision-language models with multi-negative image preferences",
    long_about = "MISP-DPO: multi-negative multimodal Direct Preference Optimization.\n\n\
        Pipeline: `misp embed` (CLIP embeddings) -> `misp sae train` (sparse autoencoder) -> \
        `misp mine` (diverse negatives) -> `misp train` (LoRA on LLaVA) -> `misp eval` \
        (POPE, CHAIR). `misp demo` runs all of it on the synthetic ShapesWorld, on CPU."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stage 0: CLIP embeddings of an image pool and of preference records.
    #[command(subcommand)]
    Embed(embed_cmd::EmbedCommand),
    /// Stage 1a: train the sparse autoencoder on fused CLIP difference vectors (Eq. 11).
    #[command(subcommand)]
    Sae(sae_cmd::SaeCommand),
    /// Stage 1b: mine K diverse negative images per record (Eq. 12, Algorithm 1).
    Mine(mine_cmd::MineArgs),
    /// Score responses: summed log-probabilities under a LLaVA / Qwen2.5-VL model (+ adapter).
    Score(score_cmd::ScoreArgs),
    /// Greedy answers of a LLaVA / Qwen2.5-VL model (+ adapter) to image + prompt rows.
    Generate(score_cmd::GenerateArgs),
    /// Stage 2: train LoRA on a LLaVA / Qwen2.5-VL checkpoint with the MISP-DPO objective (Eq. 6-10).
    Train(train_cmd::TrainArgs),
    /// An OpenAI-compatible chat API over a LLaVA / Qwen2.5-VL model (+ adapter), for VLMEvalKit,
    /// lmms-eval and other harnesses: POST /v1/chat/completions, GET /v1/models, GET /health.
    Serve(serve_cmd::ServeArgs),
    /// Stage 3: hallucination benchmarks (POPE, CHAIR) with per-item audit files.
    #[command(subcommand)]
    Eval(eval_cmd::EvalCommand),
    /// ShapesWorld: the synthetic world and its tiny CLIP / LLaVA checkpoints.
    #[command(subcommand)]
    World(world_cmd::WorldCommand),
    /// Every stage end to end on ShapesWorld, on CPU, with a report.
    Demo(demo_cmd::DemoArgs),
    /// Speed and memory benchmarks of the stages, printed as tables.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Factorised vs dense SAE scoring, scoring vs plain GEMMs, one SAE epoch.
    Mine(bench_mine::BenchMineArgs),
    /// LoRA forward+backward and greedy generation tokens/s, peak RSS.
    Model(bench_model::BenchModelArgs),
    /// Predicted peak memory of one training step for a LLaVA config.
    Memory(bench_memory::BenchMemoryArgs),
    /// LLaVA log-probs against transformers' on a fixture, on any device and dtype.
    Conformance(bench_conformance::BenchConformanceArgs),
    /// bf16 products of a frozen linear layer: misp's AVX-512 BF16 kernel against candle's.
    Gemm(bench_gemm::BenchGemmArgs),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Embed(cmd) => embed_cmd::run(cmd),
        Command::Sae(cmd) => sae_cmd::run(cmd),
        Command::Mine(args) => mine_cmd::run(args),
        Command::Score(args) => score_cmd::score(args),
        Command::Train(args) => train_cmd::run(args),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Generate(args) => score_cmd::generate(args),
        Command::Eval(cmd) => eval_cmd::run(cmd),
        Command::Serve(args) => serve_cmd::run(args),
        Command::World(cmd) => world_cmd::run(cmd),
        Command::Bench(BenchCommand::Mine(args)) => bench_mine::run(args),
        Command::Bench(BenchCommand::Model(args)) => bench_model::run(args),
        Command::Bench(BenchCommand::Memory(args)) => bench_memory::run(args),
        Command::Bench(BenchCommand::Conformance(args)) => bench_conformance::run(args),
        Command::Bench(BenchCommand::Gemm(args)) => bench_gemm::run(args),
    }
}

fn main() {
    malloc::keep_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    if let Err(err) = run(cli) {
        eprintln!("misp: error: {}", error_text(&err));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, each cause once: many library errors already quote
/// their source in their own message (`{path}: {source}`), and printing the chain as well
/// repeated it ("Corrupt footer ...: Corrupt footer ...").
fn error_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let c = cause.to_string();
        if !text.contains(&c) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&c);
        }
    }
    text
}
