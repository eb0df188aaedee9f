//! The `tessera` command line: check, inspect, plan, train, sample, bench,
//! fmt, launch, comm-check, build, new.

mod codegen;
mod launch;
mod plan;
mod serve;

use clap::{Parser, Subcommand};
use serde_json::json;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tessera_compiler::cost::{self, memory};
use tessera_compiler::diag::write_diags;
use tessera_compiler::{Model, Options, SourceMap};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Declarative, checked model specs: check, inspect, plan, train, sample, bench and launch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct SpecArgs {
    /// The .spec file.
    file: PathBuf,
    /// Override a value: `--set dims.embed=1024`, `--set parallel.mesh.tensor=4`, `--set train.batch=64`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    set: Vec<String>,
    /// Which model of the file (default: the last one defined).
    #[arg(long)]
    model: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Check a spec: names, shapes, dtypes, layout and memory. Exit 1 with diagnostics on error.
    Check(SpecArgs),
    /// Parameter counts, FLOPs per token, the mesh and rank map, memory per rank.
    Inspect {
        #[command(flatten)]
        spec: SpecArgs,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Print the graph IR instead: `forward`, `backward` (the training
        /// step's forward and backward graph, as the interpreter runs it),
        /// `rank` (one rank's program under the spec's `parallel` layout,
        /// with its collectives), `lowered` (one rank's whole training step
        /// as instructions over buffers; pick the rank with --rank),
        /// `eval` (the evaluation program: the forward pass on one device),
        /// `window` or `decode` (the generation programs: a whole context,
        /// filling the KV cache, and one token over it).
        #[arg(long, value_name = "GRAPH", conflicts_with = "json")]
        ir: Option<IrGraph>,
        /// The rank whose program `--ir rank` or `--ir lowered` prints.
        #[arg(long, default_value_t = 0, requires = "ir")]
        rank: u64,
    },
    /// The parallel plan: which rank holds which slice of each laid-out dim,
    /// memory per rank by category, and each rank's communication per step
    /// by collective and mesh axis (from the per-rank programs, checked).
    Plan {
        #[command(flatten)]
        spec: SpecArgs,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// The number of GPUs. Without --search the spec's data axis takes
        /// what its other axes leave.
        #[arg(long, value_name = "N")]
        world: Option<u64>,
        /// Predict on this device profile (default: the spec's `train.device`).
        #[arg(long, value_name = "NAME")]
        device: Option<String>,
        /// Search the layouts of the spec on --world GPUs and rank them by
        /// predicted step time.
        #[arg(long)]
        search: bool,
        /// How many of the best layouts --search prints (0: all that fit).
        #[arg(long, default_value_t = 10, requires = "search")]
        top: usize,
    },
    /// Train a model on the CPU: progress bar, DIR/metrics.jsonl, evaluation, checkpoints.
    Train {
        #[command(flatten)]
        spec: SpecArgs,
        /// Optimizer steps to run (default: the spec's `train.steps`).
        #[arg(long, allow_negative_numbers = true, value_parser = positive)]
        steps: Option<u64>,
        /// Where metrics and checkpoints go (default: runs/MODEL). The folder
        /// is locked while the run lasts.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue from a checkpoint (a run folder or a step-* folder), with
        /// the seed, data and settings it records.
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Resume even though the spec, overrides, seed, data, tokenizer or
        /// optimizer differ from the checkpoint's run (the changes are printed).
        #[arg(long, requires = "resume")]
        allow_changes: bool,
        /// Start a fresh run in a folder that holds another one, deleting its
        /// checkpoints and metrics.
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// Start from these weights instead of the spec's initialisation, with
        /// fresh optimizer state at step 0: a Tessera checkpoint (a run folder
        /// or a step-* folder), a safetensors file or sharded index, or a GGUF
        /// file, whose tensors are named by the spec's parameter paths. Every
        /// parameter and tensor is checked before the run starts. Given more
        /// than once, the files together hold the weights, each parameter
        /// in one of them (a base model and a LoRA run's adapters.safetensors).
        #[arg(long, conflicts_with = "resume", value_name = "PATH")]
        init: Vec<PathBuf>,
        /// Random seed (default: the spec's `train.seed`, or the checkpoint's on --resume).
        #[arg(long, allow_negative_numbers = true, value_parser = whole)]
        seed: Option<u64>,
        /// Training data, from the working directory (default: the spec's
        /// `train.data`, resolved like `use`; the checkpoint's on --resume).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Evaluate every N steps (default: the spec's `eval_interval`, else steps / 10).
        #[arg(long, allow_negative_numbers = true, value_parser = positive)]
        eval_interval: Option<u64>,
        /// Write a Chrome trace (chrome://tracing, ui.perfetto.dev) of the
        /// first steps: one track per rank (this process's, under a
        /// launcher) and one per rank's communication stream.
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
        /// Steps the trace records.
        #[arg(long, default_value_t = 3, requires = "trace")]
        trace_steps: u64,
        /// How the CPU backend runs fused kernels: `jit` (native code from
        /// cranelift, the default) or `interp` (the kernel-IR interpreter).
        /// Both compute the same bits.
        #[arg(long, value_name = "jit|interp")]
        backend: Option<tessera_runtime::train::Engine>,
        /// Where to train: `cpu` (the default) or `cuda` (not built yet: it
        /// says what this machine lacks, docs/cuda.md).
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        /// Seconds a collective or transfer may wait for the other ranks
        /// before the step fails naming the rank, the op, the group and the
        /// step (as torch's `init_process_group(timeout=...)`).
        #[arg(long, value_name = "SECONDS", default_value_t = 120, value_parser = positive)]
        collective_timeout: u64,
    },
    /// Train N steps after two warm-up steps and report tokens/s and achieved GFLOP/s.
    Bench {
        #[command(flatten)]
        spec: SpecArgs,
        #[arg(long, default_value_t = 5)]
        steps: u64,
        /// Print one JSON object (`tokens_per_s`, `gflops`, ...).
        #[arg(long)]
        json: bool,
        /// Training data (default: the spec's `train.data`).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Also train the PyTorch peer of this model (benches/pytorch/train_bench.py)
        /// with this Python, in the same run, and report the ratio.
        #[arg(long, value_name = "PYTHON")]
        pytorch: Option<PathBuf>,
        /// Alternate Tessera and the PyTorch peer this many times and report
        /// the medians (shared machines drift; alternating spreads the drift).
        #[arg(long, default_value_t = 1)]
        rounds: u64,
        /// The machine's fp32 peak per core, GFLOP/s, for the GEMM figure
        /// (default: measured with an FMA loop on every thread at once).
        #[arg(long)]
        peak_per_core: Option<f64>,
        /// How the CPU backend runs fused kernels: `jit` (native code from
        /// cranelift, the default) or `interp` (the kernel-IR interpreter).
        /// Both compute the same bits.
        #[arg(long, value_name = "jit|interp")]
        backend: Option<tessera_runtime::train::Engine>,
        /// Where to train: `cpu` (the default) or `cuda` (not built yet: it
        /// says what this machine lacks, docs/cuda.md).
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
    },
    /// Generate text from a checkpoint written by `tessera train`.
    Sample {
        /// A run folder (its `latest` checkpoint) or a step-* folder.
        #[arg(required_unless_present = "weights")]
        checkpoint: Option<PathBuf>,
        /// Sample from a weights file instead of a checkpoint (safetensors, a
        /// sharded index or GGUF, its tensors named by the spec's parameter
        /// paths); needs --spec.
        #[arg(long, conflicts_with = "checkpoint", requires = "spec", value_name = "PATH")]
        weights: Vec<PathBuf>,
        #[arg(long, default_value = "")]
        prompt: String,
        /// A user message to answer: the prompt is the model's chat template
        /// (which the weights file carries: a GGUF's, or the
        /// tokenizer_config.json beside a checkpoint) over it, and only the
        /// answer is printed.
        #[arg(long, conflicts_with = "prompt", requires = "weights", value_name = "MESSAGE")]
        chat: Option<String>,
        /// Tokens to generate.
        #[arg(long, default_value_t = 200, allow_negative_numbers = true, value_parser = whole_usize)]
        tokens: usize,
        /// Softmax temperature, 0 or more; 0 is greedy decoding (default:
        /// the spec's `infer.sampling`, else 0.8).
        #[arg(long, allow_negative_numbers = true, value_parser = temperature)]
        temperature: Option<f64>,
        /// Sample from the K most likely tokens (K ≥ 1).
        #[arg(long, allow_negative_numbers = true, value_parser = top_k)]
        top_k: Option<usize>,
        /// Sample from the smallest set of tokens whose probability reaches P (0 < P ≤ 1).
        #[arg(long, allow_negative_numbers = true, value_parser = top_p)]
        top_p: Option<f64>,
        /// The sampling seed (default: the spec's `infer.seed`, else 0).
        #[arg(long, allow_negative_numbers = true, value_parser = whole)]
        seed: Option<u64>,
        /// Recompute the whole window for each token instead of using a KV cache.
        #[arg(long)]
        no_kv_cache: bool,
        /// The spec (default: the one the checkpoint was trained with).
        #[arg(long)]
        spec: Option<PathBuf>,
    },
    /// Serve a model over HTTP with OpenAI's API (/v1/completions,
    /// /v1/chat/completions, /v1/embeddings, /v1/models), batching requests
    /// continuously over a paged KV cache (docs/inference.md).
    Serve {
        /// A run folder (its `latest` checkpoint) or a step-* folder.
        #[arg(required_unless_present = "weights")]
        checkpoint: Option<PathBuf>,
        /// Serve a weights file instead of a checkpoint (safetensors, a sharded
        /// index or GGUF); needs --spec. Repeat for a base and its adapters.
        #[arg(long, conflicts_with = "checkpoint", requires = "spec", value_name = "PATH")]
        weights: Vec<PathBuf>,
        /// The spec (default: the one the checkpoint was trained with).
        #[arg(long)]
        spec: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The port (0: any free one; the address is printed).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// The model's name in the API (default: the spec's model name).
        #[arg(long)]
        name: Option<String>,
        /// Sequences decoded at once (default: the spec's `infer.max_batch`).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        max_batch: Option<u64>,
        /// Positions of one sequence, prompt and completion (default: the
        /// spec's `infer.max_len`, else the model's window).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        max_len: Option<u64>,
        /// KV cache blocks (default: enough for max_batch sequences of max_len).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        num_blocks: Option<u64>,
        /// Requests that may wait beyond the running batch before new ones
        /// get 429 (default: 4 × max_batch).
        #[arg(long)]
        max_queue: Option<usize>,
        /// A Jinja chat template file (default: the one the weights carry).
        #[arg(long, value_name = "FILE")]
        chat_template: Option<PathBuf>,
    },
    /// Write a checkpoint's weights as a published checkpoint, named and laid
    /// out as the spec's `weights FORMAT for MODEL` mapping says:
    /// `model.safetensors` and `config.json` (docs/inference.md).
    Export {
        /// A run folder (its `latest` checkpoint), a step-* folder, or a
        /// weights file (with --spec).
        checkpoint: PathBuf,
        /// The mapping to write (`hf`).
        #[arg(long, value_name = "FORMAT")]
        to: String,
        /// The folder to write (created).
        out: PathBuf,
        /// The spec (default: the one the checkpoint was trained with).
        #[arg(long)]
        spec: Option<PathBuf>,
    },
    /// Fold a LoRA run's adapters into their weights (W + alpha/rank · A·B)
    /// and write the model's weights without adapters, named by parameter
    /// paths, to a safetensors file (docs/inference.md).
    Merge {
        /// A run folder (its `latest` checkpoint) or a step-* folder of a run with `train.lora`.
        checkpoint: PathBuf,
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// The spec (default: the one the checkpoint was trained with).
        #[arg(long)]
        spec: Option<PathBuf>,
    },
    /// Write a standalone crate for a spec (`cargo tessera build`): the
    /// generated module in src/lib.rs, `train` and `sample` commands in
    /// src/main.rs, the spec's files under spec/ (docs/codegen.md).
    Build {
        #[command(flatten)]
        spec: SpecArgs,
        /// The crate's folder (default: the model's name).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Create a user crate NAME that expands a spec with `tessera::spec!`
    /// (`cargo tessera new`).
    New { name: String },
    /// Start this machine's ranks as processes, as torchrun does: each runs
    /// the tessera command after `--` with RANK, LOCAL_RANK, WORLD_SIZE,
    /// LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. If a rank fails,
    /// the others are stopped and the failure is reported (docs/launch.md).
    Launch {
        /// Ranks to start on this machine (one GPU each).
        #[arg(long, value_parser = positive)]
        nproc_per_node: u64,
        /// Machines in the job, each running one `tessera launch`.
        #[arg(long, default_value_t = 1, value_parser = positive)]
        nnodes: u64,
        /// This machine's index among them, from 0.
        #[arg(long, default_value_t = 0, value_parser = whole)]
        node_rank: u64,
        /// HOST:PORT of node 0, where rank 0 hosts the store the ranks meet
        /// at; the same on every node (default: 127.0.0.1 and a free port;
        /// required with --nnodes above 1).
        #[arg(long, value_name = "HOST:PORT")]
        master: Option<String>,
        /// After a failed rank, restart every rank up to this many times
        /// (torchelastic's restarts); `train` resumes from the last complete
        /// checkpoint in its --out folder.
        #[arg(long, default_value_t = 0, value_parser = whole)]
        max_restarts: u64,
        /// The command each rank runs: `train FILE ...`, `bench FILE ...` or `comm-check`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },
    /// Check that the ranks of a multi-process launch meet (under `tessera
    /// launch`, torchrun, srun or mpirun): they join rank 0's store, agree on
    /// a run id, check their placement and time barriers.
    CommCheck {
        /// Barriers to time.
        #[arg(long, default_value_t = 20, value_parser = whole)]
        rounds: u64,
        /// Seconds a wait may last before the check fails naming who it waited for.
        #[arg(long, default_value_t = 120, value_parser = positive)]
        timeout: u64,
        /// Then stay connected this many seconds, stopping at once if a rank is lost.
        #[arg(long, default_value_t = 0, value_parser = whole)]
        hold: u64,
    },
    /// Run every fused kernel of the spec's lowered programs (every rank's
    /// step and the evaluation) on this machine's GPU and compare each with
    /// the CPU backend's on the same random inputs. Needs an NVIDIA GPU and
    /// NVRTC (docs/cuda.md).
    CheckKernels {
        #[command(flatten)]
        spec: SpecArgs,
        /// Which GPU (default: LOCAL_RANK under a launcher, else 0).
        #[arg(long)]
        gpu: Option<usize>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print a spec in canonical form.
    Fmt {
        file: PathBuf,
        /// Rewrite the file in place.
        #[arg(long, conflicts_with = "check")]
        write: bool,
        /// Exit 1 if the file is not in canonical form.
        #[arg(long)]
        check: bool,
    },
}

// Value parsers that state the legal range (clap's own parse errors suggest
// `-- -1` for a negative number, which is no help).

fn whole(s: &str) -> Result<u64, String> {
    s.trim().parse::<u64>().map_err(|_| format!("expected a whole number 0 or more, got `{s}`"))
}

fn whole_usize(s: &str) -> Result<usize, String> {
    whole(s).map(|n| n as usize)
}

fn positive(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected a whole number 1 or more, got `{s}`")),
    }
}

fn temperature(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("expected a finite number 0 or more (0 is greedy decoding), got `{s}`")),
    }
}

fn top_k(s: &str) -> Result<usize, String> {
    positive(s).map(|n| n as usize).map_err(|_| format!("expected a whole number of tokens 1 or more, got `{s}`"))
}

fn top_p(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err(format!("expected a probability above 0 and at most 1, got `{s}`")),
    }
}

/// Where `train` and `bench` run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Device {
    Cpu,
    Cuda,
}

/// Whether `device` can train here: the CPU always; CUDA not yet (the error
/// says what is missing: the driver, a GPU, or the backend itself).
fn on_device(device: Device) -> Result<(), ExitCode> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda => {
            eprintln!("error: --device cuda: {}", tessera_runtime::backend::cuda::why_not());
            Err(ExitCode::from(1))
        }
    }
}

/// Which graph `inspect --ir` prints.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum IrGraph {
    Forward,
    Backward,
    Rank,
    /// The rank's lowered program: its whole training step over buffers.
    Lowered,
    /// The lowered evaluation program: one microbatch's forward pass on one device.
    Eval,
    /// The generation window program: the forward pass over a whole context, filling the KV cache.
    Window,
    /// The generation step program: one position at a run-time position, over the KV cache.
    Decode,
    /// The CUDA C of every fused kernel of the rank's lowered program (as NVRTC compiles it).
    Cuda,
    /// The Rust module that `tessera::spec!`, `tessera_build` and `tessera build` generate.
    Rust,
}

/// The CUDA C of each fused kernel of `p`, each after a comment with its
/// instruction and the spec lines it comes from (`compiler::kernel::cuda`).
fn print_cuda(sources: &SourceMap, p: &tessera_compiler::lower::Program) -> ExitCode {
    use tessera_compiler::lower::Kind;
    for (n, ins) in p.instrs.iter().filter(|i| matches!(i.kind, Kind::Kernel { .. })).enumerate() {
        let Kind::Kernel { kernel } = &ins.kind else { continue };
        let dtypes: Vec<_> = ins.ins.iter().chain(&ins.outs).map(|b| p.buffer(*b).ty.dtype).collect();
        match tessera_compiler::kernel::cuda::emit(kernel, &dtypes, &format!("kernel{n}")) {
            Ok(k) => {
                let launch = if k.rows {
                    format!("one row per block, {} threads", tessera_compiler::kernel::cuda::THREADS)
                } else {
                    "grid-stride over the positions".to_string()
                };
                println!("// kernel {n} ({launch}): {}", tessera_compiler::lower::text::instr_text(ins));
                for span in &ins.origin {
                    println!("//   from {}", sources.quote(*span));
                }
                println!("{}", k.source);
            }
            Err(e) => {
                eprintln!("error: kernel {n}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

fn print_ir(sources: &SourceMap, m: &Model, which: IrGraph, rank: u64) -> ExitCode {
    // The one-device programs: evaluation and generation.
    let program = match which {
        IrGraph::Window | IrGraph::Decode => {
            let g = tessera_compiler::driver::compile_one_sequence(m, Default::default());
            Some(g.map_err(|e| e.to_string()).and_then(|g| {
                match which {
                    IrGraph::Window => Ok(g.window),
                    _ => g
                        .paged
                        .map(|p| p.steps.into_iter().next().expect("a step of one sequence").1)
                        .map_err(|why| format!("`{}` has no decode step program: {why}", m.name)),
                }
            }))
        }
        IrGraph::Eval => {
            let passes = tessera_compiler::driver::Passes { lower: false, ..Default::default() };
            let p = tessera_compiler::driver::compile_with(m, Some(&[0]), passes)
                .and_then(|c| tessera_compiler::driver::compile_eval(m, &c.backward, passes));
            Some(p.map_err(|e| e.to_string()))
        }
        _ => None,
    };
    match program {
        Some(Ok(p)) => {
            print!("{}", tessera_compiler::lower::text::print(&p));
            return ExitCode::SUCCESS;
        }
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
        None => {}
    }
    if let IrGraph::Lowered | IrGraph::Cuda = which {
        if rank >= m.parallel.world() {
            eprintln!("error: rank {rank} is outside the mesh of {} ranks", m.parallel.world());
            return ExitCode::from(1);
        }
        return match tessera_compiler::driver::compile_ranks(m, Some(&[rank])) {
            Ok(c) => match c.programs.first() {
                Some(p) if matches!(which, IrGraph::Cuda) => print_cuda(sources, p),
                Some(p) => {
                    print!("{}", tessera_compiler::lower::text::print(p));
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("error: rank {rank} is outside the mesh of {} ranks", c.programs.len());
                    ExitCode::from(1)
                }
            },
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        };
    }
    match which {
        IrGraph::Lowered | IrGraph::Cuda | IrGraph::Eval | IrGraph::Window | IrGraph::Decode | IrGraph::Rust => {
            unreachable!("handled above")
        }
        IrGraph::Forward => print!("{}", m.graph.to_text()),
        IrGraph::Backward | IrGraph::Rank => {
            if m.graph.output("loss").is_none() {
                eprintln!(
                    "error: `{}` has no `loss` output to differentiate\n  help: assign `loss = ...` in the model",
                    m.name
                );
                return ExitCode::from(1);
            }
            if matches!(which, IrGraph::Rank) && rank >= m.parallel.world() {
                eprintln!("error: rank {rank} is outside the mesh of {} ranks", m.parallel.world());
                return ExitCode::from(1);
            }
            let passes = tessera_compiler::driver::Passes { lower: false, ..Default::default() };
            match tessera_compiler::driver::compile_with(m, Some(&[rank]), passes) {
                Ok(c) if matches!(which, IrGraph::Backward) => print!("{}", c.backward.graph.to_text()),
                Ok(c) => print!("{}", c.ranks[0].to_text()),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            }
        }
    }
    ExitCode::SUCCESS
}

/// Stack for the command's thread. Nesting is bounded by the parser
/// (`syntax::limits`), but the checker inlines blocks within blocks, each
/// with expressions up to the depth limit: a large stack keeps every pass
/// well inside it. Only the pages that are touched are committed.
const STACK_BYTES: usize = 256 << 20;

pub fn main(args: Vec<OsString>) -> ExitCode {
    let run = std::thread::Builder::new().name("tessera".into()).stack_size(STACK_BYTES).spawn(move || command(args));
    match run.map(|h| h.join()) {
        Ok(Ok(code)) => code,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(e) => {
            eprintln!("error: cannot start a thread with a {} MiB stack: {e}", STACK_BYTES >> 20);
            ExitCode::from(1)
        }
    }
}

fn command(args: Vec<OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
        Command::Check(a) => match load(&a) {
            Ok(m) => {
                println!("{}", summary(&m));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Inspect { spec, ir: Some(IrGraph::Rust), .. } => {
            codegen::print(&spec.file, &spec.set, spec.model.as_deref())
        }
        Command::Export { checkpoint, to, out, spec } => export(&checkpoint, &to, &out, spec),
        Command::Merge { checkpoint, out, spec } => merge(&checkpoint, &out, spec),
        Command::Build { spec, out } => codegen::build(&spec.file, &spec.set, spec.model.as_deref(), out),
        Command::New { name } => codegen::new(&name),
        Command::Inspect { spec, ir: Some(which), rank, .. } => match load_sources(&spec) {
            Ok((sources, m)) => print_ir(&sources, &m, which, rank),
            Err(code) => code,
        },
        Command::Inspect { spec, json, ir: None, .. } => match load(&spec) {
            Ok(m) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&inspect_json(&m)).expect("json"));
                } else {
                    print!("{}", inspect_text(&m));
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Plan { spec, json, world, device, search, top } => {
            plan::command(spec, json, world, device, search, top)
        }
        Command::Fmt { file, write, check } => fmt(&file, write, check),
        Command::Launch { nproc_per_node, nnodes, node_rank, master, max_restarts, command } => {
            launch::run(nproc_per_node, nnodes, node_rank, master, max_restarts, command)
        }
        Command::CommCheck { rounds, timeout, hold } => launch::comm_check(rounds, timeout, hold),
        Command::CheckKernels { spec, gpu, json } => match load(&spec) {
            Ok(m) => check_kernels(&m, gpu, json),
            Err(code) => code,
        },
        Command::Train {
            spec,
            steps,
            out,
            resume,
            allow_changes,
            overwrite,
            init,
            seed,
            data,
            eval_interval,
            trace,
            trace_steps,
            backend,
            device,
            collective_timeout,
        } => {
            if let Err(code) = on_device(device) {
                return code;
            }
            let timeout = std::time::Duration::from_secs(collective_timeout);
            // A resume applies the run's recorded overrides first; the
            // user's, after them, win (a new layout, or a change to allow).
            let mut spec = spec;
            let recorded = match resume.as_deref().map(tessera_runtime::train::checkpoint::run_of) {
                Some(Ok(r)) => r,
                Some(Err(e)) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
                None => None,
            };
            if let Some(r) = &recorded {
                spec.set = r.overrides.iter().cloned().chain(spec.set).collect();
            }
            match load(&spec) {
                Ok(m) => {
                    let world = match launch::process_world((m.parallel.world(), &mesh_text(&m)), timeout) {
                        Ok(w) => w,
                        Err(code) => return code,
                    };
                    let source = (spec.file.canonicalize().unwrap_or(spec.file.clone()), spec.set.clone());
                    let trace = trace.map(|p| (p, trace_steps));
                    let run = RunArgs {
                        steps,
                        out,
                        resume,
                        recorded,
                        allow_changes,
                        overwrite,
                        init,
                        seed,
                        data,
                        eval_interval,
                        trace,
                        backend: backend.unwrap_or_default(),
                        world,
                        timeout,
                    };
                    train(m, source, run)
                }
                Err(code) => code,
            }
        }
        Command::Bench { spec, steps, json, data, pytorch, rounds, peak_per_core, backend, device } => {
            if let Err(code) = on_device(device) {
                return code;
            }
            match load(&spec) {
                Ok(m) if launch::single_process((m.parallel.world(), &mesh_text(&m))).is_err() => ExitCode::from(1),
                Ok(m) => bench(
                    m,
                    BenchArgs {
                        steps,
                        json,
                        data,
                        pytorch,
                        rounds,
                        peak_per_core,
                        backend: backend.unwrap_or_default(),
                    },
                ),
                Err(code) => code,
            }
        }
        Command::Serve {
            checkpoint,
            weights,
            spec,
            host,
            port,
            name,
            max_batch,
            max_len,
            num_blocks,
            max_queue,
            chat_template,
        } => {
            let from = match (checkpoint, weights) {
                (Some(c), _) => Weights::Checkpoint(c),
                (None, w) => Weights::File(w),
            };
            let template = match (&chat_template, &from) {
                (Some(f), _) => match std::fs::read_to_string(f) {
                    Ok(t) => Some(tessera_runtime::train::tokenizer::ChatTemplate::new(t)),
                    Err(e) => {
                        eprintln!("error: cannot read the chat template {}: {e}", f.display());
                        return ExitCode::from(1);
                    }
                },
                (None, Weights::File(w)) => tessera_runtime::train::tokenizer::ChatTemplate::of_weights(&w[0]),
                (None, Weights::Checkpoint(c)) => tessera_runtime::train::tokenizer::ChatTemplate::of_weights(c),
            };
            let loaded = match load_weights(&from, spec) {
                Ok(l) => l,
                Err(code) => return code,
            };
            let args = serve::ServeArgs { host, port, name, max_batch, max_len, num_blocks, max_queue };
            serve::serve(loaded, template, args)
        }
        Command::Sample {
            checkpoint,
            weights,
            prompt,
            chat,
            tokens,
            temperature,
            top_k,
            top_p,
            seed,
            no_kv_cache,
            spec,
        } => {
            let flags = SampleFlags { tokens, temperature, top_k, top_p, seed, kv_cache: !no_kv_cache };
            let from = match (checkpoint, weights) {
                (Some(c), _) => Weights::Checkpoint(c),
                (None, w) => Weights::File(w),
            };
            let prompt = match (&chat, &from) {
                (Some(message), Weights::File(w)) => {
                    match tessera_runtime::train::tokenizer::ChatTemplate::of_weights(&w[0])
                        .ok_or_else(|| {
                            format!("{} carries no chat template; pass the prompt with --prompt", w[0].display())
                        })
                        .and_then(|t| t.render(&[("user", message)]).map_err(|e| e.to_string()))
                    {
                        Ok(p) => p,
                        Err(e) => {
                            eprintln!("error: {e}");
                            return ExitCode::from(1);
                        }
                    }
                }
                _ => prompt,
            };
            match sample(&from, spec, &prompt, &flags) {
                Ok(text) if chat.is_some() => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Ok(text) => {
                    println!("{prompt}{text}");
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
    }
}

/// `tessera check-kernels`: the spec's fused kernels on the GPU against the CPU backend's.
fn check_kernels(m: &Model, gpu: Option<usize>, json: bool) -> ExitCode {
    use tessera_runtime::backend::cuda_kernels;
    let fail = |e: String| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    };
    let ordinal = gpu.or_else(|| std::env::var("LOCAL_RANK").ok().and_then(|v| v.parse().ok())).unwrap_or(0);
    let device = match cuda_kernels::Gpu::open(ordinal) {
        Ok(g) => g,
        Err(e) => return fail(e),
    };
    if let Err(e) = tessera_runtime::backend::nvrtc::available() {
        return fail(e);
    }
    let t = match tessera_compiler::driver::compile_training(m, None) {
        Ok(t) => t,
        Err(e) => return fail(e.to_string()),
    };
    let mut programs: Vec<&tessera_compiler::lower::Program> = t.step.programs.iter().collect();
    programs.push(&t.eval);
    let cache = tessera_runtime::backend::nvrtc::cache_dir();
    let checks = match cuda_kernels::compare(&device, &programs, &cache) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let failed = checks.iter().filter(|c| !c.ok).count();
    if json {
        let v =
            json!({ "gpu": device.name, "arch": device.arch, "model": m.name, "kernels": checks, "failed": failed });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for c in &checks {
            let verdict = if c.ok { "ok  " } else { "FAIL" };
            println!("{verdict} max error {:.2e} (allowed {:.2e}) {}", c.max_error, c.tolerance, c.instr);
        }
        println!(
            "{}: {} kernels on {} ({}), {failed} outside tolerance",
            m.name,
            checks.len(),
            device.name,
            device.arch
        );
    }
    if failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

fn load(a: &SpecArgs) -> Result<Model, ExitCode> {
    load_with(a, &[], false)
}

/// `load`, keeping the sources (to quote the spec lines of what it compiles to).
fn load_sources(a: &SpecArgs) -> Result<(SourceMap, Model), ExitCode> {
    load_full(a, &[], false)
}

/// Check the spec with extra overrides after the user's, and (unless
/// `skip_memory_check`: the planner prices memory layout by layout) that
/// every rank fits its `train.device` (`driver::check_memory`).
fn load_with(a: &SpecArgs, extra: &[String], skip_memory_check: bool) -> Result<Model, ExitCode> {
    load_full(a, extra, skip_memory_check).map(|(_, m)| m)
}

fn load_full(a: &SpecArgs, extra: &[String], skip_memory_check: bool) -> Result<(SourceMap, Model), ExitCode> {
    let mut sources = SourceMap::new();
    let mut overrides = a.set.clone();
    overrides.extend(extra.iter().cloned());
    let opts = Options { overrides, model: a.model.clone(), micro_batch: None };
    let m = tessera_compiler::check_path(&mut sources, &a.file, &opts)
        .and_then(|m| match skip_memory_check {
            true => Ok(m),
            false => tessera_compiler::driver::check_memory(&m).map(|()| m).map_err(Into::into),
        })
        .map_err(|d| {
            let mut err = codespan_stderr();
            write_diags(&sources, &d.0, &mut err);
            ExitCode::from(1)
        })?;
    // Warnings once per command (the planner rechecks with extra overrides).
    if extra.is_empty() || !skip_memory_check {
        write_diags(&sources, &m.warnings, &mut codespan_stderr());
    }
    Ok((sources, m))
}

fn codespan_stderr() -> codespan_reporting::term::termcolor::StandardStream {
    use codespan_reporting::term::termcolor::{ColorChoice, StandardStream};
    let choice =
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) { ColorChoice::Auto } else { ColorChoice::Never };
    StandardStream::stderr(choice)
}

fn fmt(file: &PathBuf, write: bool, check: bool) -> ExitCode {
    let mut sources = SourceMap::new();
    let text = match tessera_compiler::check::read_spec(file) {
        Ok(t) => t,
        Err(d) => {
            write_diags(&sources, &d.0, &mut codespan_stderr());
            return ExitCode::from(1);
        }
    };
    let id = sources.add(file.to_string_lossy(), text.clone());
    let ast = match tessera_compiler::syntax::parse_file(id, &text) {
        Ok(a) => a,
        Err(d) => {
            write_diags(&sources, &[d], &mut codespan_stderr());
            return ExitCode::from(1);
        }
    };
    let out = tessera_compiler::syntax::print_file(&ast, &text);
    if check {
        if out != text {
            eprintln!("{} is not canonically formatted; run `tessera fmt --write {}`", file.display(), file.display());
            return ExitCode::from(1);
        }
        return ExitCode::SUCCESS;
    }
    if write {
        let tmp = file.with_extension("spec.tmp");
        if let Err(e) = std::fs::write(&tmp, &out).and_then(|_| std::fs::rename(&tmp, file)) {
            eprintln!("error: cannot write `{}`: {e}", file.display());
            return ExitCode::from(1);
        }
    } else {
        print!("{out}");
    }
    ExitCode::SUCCESS
}

/// 1234567 → "1.23M".
pub fn human(n: f64) -> String {
    let (v, s) = if n >= 1e12 {
        (n / 1e12, "T")
    } else if n >= 1e9 {
        (n / 1e9, "B")
    } else if n >= 1e6 {
        (n / 1e6, "M")
    } else if n >= 1e3 {
        (n / 1e3, "K")
    } else {
        return format!("{n:.0}");
    };
    format!("{v:.2}{s}")
}

/// Bytes in B, KB, MB, GB or TB (powers of 1000).
fn bytes_text(b: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1000.0 && u + 1 < units.len() {
        x /= 1000.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{x:.2} {}", units[u]) }
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

fn mesh_text(m: &Model) -> String {
    if m.parallel.mesh.is_empty() {
        return "single device".into();
    }
    m.parallel.mesh.iter().map(|(a, n)| format!("{a} {n}")).collect::<Vec<_>>().join(" × ")
}

fn summary(m: &Model) -> String {
    let total = cost::params_total(m);
    let active = cost::params_active(m);
    let act = if active != total { format!(" ({} active)", human(active as f64)) } else { String::new() };
    let mut s = format!(
        "ok: {} — {} params{act}, world {} ({})",
        m.name,
        human(total as f64),
        m.parallel.world(),
        mesh_text(m)
    );
    if let Some(dev) = m.train.as_ref().and_then(|t| t.device.as_deref()) {
        let (rank, w) = memory::worst_rank(&memory::memory_per_rank(m));
        s.push_str(&format!(", fits {dev}: rank {rank} needs {}", gib(w.total)));
    }
    s
}

fn inspect_json(m: &Model) -> serde_json::Value {
    let mem = memory::memory_per_rank(m);
    let order = tessera_compiler::parallel::mesh::rank_order(&m.parallel);
    let mesh: serde_json::Map<String, serde_json::Value> =
        m.parallel.mesh.iter().map(|(a, n)| (a.clone(), json!(n))).collect();
    let params: Vec<serde_json::Value> = m
        .params
        .iter()
        .map(|p| {
            json!({
                "path": p.path,
                "shape": p.ty.dims.iter().map(|d| json!({"name": d.name, "size": d.size})).collect::<Vec<_>>(),
                "count": p.ty.numel(),
                "placement": p.placement,
                "expert": p.expert.is_some(),
            })
        })
        .collect();
    json!({
        "model": m.name,
        "params_total": cost::params_total(m),
        "params_active": cost::params_active(m),
        "params_per_rank": memory::params_per_rank(m),
        "flops_per_token_forward": cost::flops_per_token_forward(m),
        "flops_per_token_train": cost::flops_per_token_train(m),
        "attention_flops_per_token_forward": cost::attention_flops_per_token(m),
        "flop_convention": cost::FLOP_CONVENTION,
        "tokens_per_sample": m.tokens_per_sample,
        "micro_batch": m.micro_batch,
        "world": m.parallel.world(),
        "mesh": mesh,
        "rank_order": order.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>(),
        "layout": m.parallel.layout.iter().map(|(d, a)| json!({"dim": d, "axis": a})).collect::<Vec<_>>(),
        "pipeline": m.parallel.pipeline,
        "zero": m.parallel.zero,
        "recompute": m.parallel.recompute,
        "device": m.train.as_ref().and_then(|t| t.device.clone()),
        "memory_per_rank": mem,
        "estimate": estimate_of(m).and_then(|e| e.ok()).and_then(|e| serde_json::to_value(e).ok()),
        "lowered": lowered_json(m),
        "params": params,
    })
}

/// Each rank's lowered training step: its regions' bytes and instruction
/// count (`null` for a model that does not train; `{"error": ...}` when it
/// does not lower). Ranks that differ only in their data coordinate run the
/// same program on other data, so one of them is lowered for all (unless
/// experts are laid out on the data axis, where ranks hold different experts).
fn lowered_json(m: &Model) -> serde_json::Value {
    use tessera_compiler::lower::Region;
    use tessera_compiler::parallel::mesh::{coords, rank_order};
    if m.train.is_none() || m.graph.output("loss").is_none() {
        return serde_json::Value::Null;
    }
    let order = rank_order(&m.parallel);
    let data = m.parallel.data_axis().filter(|a| m.expert_dim().and_then(|e| m.parallel.axis_of(e)) != Some(*a));
    let at = data.and_then(|a| order.iter().position(|(x, _)| x == a));
    let key = |r: u64| {
        let mut c = coords(&order, r);
        if let Some(i) = at {
            c[i] = 0;
        }
        c
    };
    let world = m.parallel.world();
    let mut reps: Vec<u64> = Vec::new();
    for r in 0..world {
        if !reps.iter().any(|&x| key(x) == key(r)) {
            reps.push(r);
        }
    }
    // About three instructions per forward node (forward, backward, update) per microbatch.
    let dp = m.parallel.data().max(1);
    let micro = (m.train.as_ref().map(|t| t.batch).unwrap_or(1) / m.micro_batch.max(1) / dp).max(1);
    let work = (3 * m.graph.len() as u64).saturating_mul(micro).saturating_mul(reps.len() as u64);
    if work > LOWER_IN_INSPECT {
        return json!({
            "skipped": format!(
                "{} distinct rank programs of about {} instructions each are too many to lower here; \
                 `tessera inspect FILE --ir lowered --rank R` lowers one",
                reps.len(),
                work / reps.len() as u64
            )
        });
    }
    // One program at a time: only its figures are kept.
    let mut figures = Vec::with_capacity(reps.len());
    for &r in &reps {
        match tessera_compiler::driver::compile_ranks(m, Some(&[r])) {
            Ok(c) => {
                let p = &c.programs[0];
                let bytes = |r: Region| p.region_bytes(r);
                figures.push(json!({
                    "arena_bytes": p.arena_bytes(),
                    "param_bytes": bytes(Region::Param),
                    "grad_bytes": bytes(Region::Grad),
                    "optimizer_bytes": bytes(Region::Optim),
                    "io_bytes": bytes(Region::Io),
                    "instructions": p.instrs.len(),
                }));
            }
            Err(e) => return json!({ "error": e.to_string() }),
        }
    }
    (0..world)
        .map(|r| {
            let i = reps.iter().position(|&x| key(x) == key(r)).expect("every rank has a representative");
            let mut f = figures[i].clone();
            f["rank"] = json!(r);
            f
        })
        .collect()
}

/// The most instructions (over the distinct rank programs) `inspect --json` lowers.
const LOWER_IN_INSPECT: u64 = 2_000_000;

/// The predicted step on the spec's `train.device`, when it names a
/// profile and the model trains.
fn estimate_of(m: &Model) -> Option<Result<tessera_compiler::cost::time::Estimate, String>> {
    let dev = m.train.as_ref()?.device.as_deref().and_then(tessera_compiler::device::device)?;
    Some(cost::time::estimate(m, dev))
}

fn inspect_text(m: &Model) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let total = cost::params_total(m);
    let active = cost::params_active(m);
    let _ = writeln!(s, "model {}", m.name);
    let _ = writeln!(s, "  params        {} ({total})", human(total as f64));
    if active != total {
        let _ = writeln!(s, "  active        {} ({active}) per token", human(active as f64));
    }
    if m.params.iter().any(|p| p.frozen) {
        let trains: u64 = m.params.iter().filter(|p| !p.frozen).map(|p| p.ty.numel()).sum();
        let _ = writeln!(s, "  trainable     {} ({trains}); the others are frozen", human(trains as f64));
    }
    let _ = writeln!(
        s,
        "  FLOPs/token   forward {}, train step {}  (attention {} of forward)",
        human(cost::flops_per_token_forward(m)),
        human(cost::flops_per_token_train(m)),
        human(cost::attention_flops_per_token(m))
    );
    let _ = writeln!(s, "  convention    {}", cost::FLOP_CONVENTION);
    let _ = writeln!(s, "\nparameters");
    for p in &m.params {
        let dims: Vec<String> = p.ty.dims.iter().map(|d| format!("{}={}", d.name, d.size)).collect();
        let tag = match (p.expert.is_some(), p.adapter_of.is_some(), p.frozen) {
            (_, true, _) => "  (LoRA adapter)",
            (true, _, true) => "  (experts, frozen)",
            (true, _, false) => "  (experts)",
            (false, _, true) => "  (frozen)",
            _ => "",
        };
        let _ = writeln!(s, "  {:<48} [{}]  {}{tag}", p.path, dims.join(", "), human(p.ty.numel() as f64));
    }
    let _ = writeln!(s, "\nmesh  {} = {} ranks", mesh_text(m), m.parallel.world());
    for (d, a) in &m.parallel.layout {
        let _ = writeln!(s, "  {d} -> {a}");
    }
    let order = tessera_compiler::parallel::mesh::rank_order(&m.parallel);
    if !order.is_empty() {
        let mut stride = 1;
        let mut parts = Vec::new();
        for (a, n) in order.iter().rev() {
            parts.push(format!("{a}: {n} × stride {stride}"));
            stride *= n;
        }
        parts.reverse();
        let _ = writeln!(s, "rank map (outermost first)  {}", parts.join(", "));
    }
    s += &memory_table(m);
    match estimate_of(m) {
        Some(Ok(e)) => s += &plan::estimate_text(&e),
        Some(Err(e)) => s += &format!("\nno step-time prediction: {e}\n"),
        None => {}
    }
    s
}

/// Memory per rank by category, consecutive equal ranks grouped.
fn memory_table(m: &Model) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let mem = memory::memory_per_rank(m);
    let per_rank = memory::params_per_rank(m);
    let _ = writeln!(
        s,
        "\nmemory per rank{}",
        m.train.as_ref().and_then(|t| t.device.as_deref()).map(|d| format!(" (device {d})")).unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "  {:<10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "ranks", "params", "weights", "grads", "optimizer", "activations", "total"
    );
    // Group consecutive ranks with identical figures.
    let mut i = 0;
    while i < mem.len() {
        let mut j = i;
        while j + 1 < mem.len() && mem[j + 1] == mem[i] && per_rank[j + 1] == per_rank[i] {
            j += 1;
        }
        let label = if i == j { format!("{i}") } else { format!("{i}-{j}") };
        let r = mem[i];
        let _ = writeln!(
            s,
            "  {:<10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
            label,
            human(per_rank[i] as f64),
            gib(r.params),
            gib(r.grads),
            gib(r.optimizer),
            gib(r.activations),
            gib(r.total)
        );
        i = j + 1;
        if s.lines().count() > 200 {
            let _ = writeln!(s, "  ... ({} ranks in all; use --json for every rank)", mem.len());
            break;
        }
    }
    let (rank, w) = memory::worst_rank(&mem);
    let _ = writeln!(s, "  worst: rank {rank}, {}", gib(w.total));
    s
}

/// `tessera train`'s options beyond the spec.
struct RunArgs {
    steps: Option<u64>,
    out: Option<PathBuf>,
    resume: Option<PathBuf>,
    /// The run `resume` names, as its checkpoint records it.
    recorded: Option<tessera_runtime::train::checkpoint::RunRecord>,
    allow_changes: bool,
    overwrite: bool,
    /// Weights to start from (`--init`).
    init: Vec<PathBuf>,
    seed: Option<u64>,
    data: Option<PathBuf>,
    eval_interval: Option<u64>,
    trace: Option<(PathBuf, u64)>,
    backend: tessera_runtime::train::Engine,
    /// This process's rank in a world of processes (`mpirun`), or `None`.
    world: Option<tessera_runtime::comm::ProcessWorld>,
    /// How long a collective waits for the other ranks.
    timeout: std::time::Duration,
}

fn train(m: Model, source: (PathBuf, Vec<String>), args: RunArgs) -> ExitCode {
    use std::io::Write as _;
    use tessera_runtime::train::{RunConfig, Trainer, checkpoint};
    let RunArgs {
        steps,
        out,
        resume,
        recorded,
        allow_changes,
        overwrite,
        seed,
        data,
        eval_interval,
        trace,
        backend,
        world,
        timeout,
        init,
    } = args;
    // Across processes, rank 0 writes the run's files and prints; an error
    // on any rank stops them all.
    let writer = world.as_ref().is_none_or(|w| w.rank() == 0);
    let fail = |e: &dyn std::fmt::Display| launch::stop(world.as_ref(), &e.to_string());
    // Every pass (after the memory check), before the run folder is touched.
    let training =
        match tessera_compiler::driver::compile_training(&m, tessera_runtime::train::memory::available_bytes()) {
            Ok(t) => t,
            Err(e) => return fail(&e),
        };
    // --init: the weights are read and checked before the run folder is touched.
    let init = match init.as_slice() {
        [] => None,
        paths => match tessera_runtime::weights::read_parts(paths, &m) {
            Ok(w) => Some((paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" + "), w)),
            Err(e) => return fail(&e),
        },
    };
    let t = training.train.clone();
    let steps = steps
        .or(match t.length {
            Some(tessera_compiler::config::Amount::Steps(s)) => Some(s as u64),
            _ => None,
        })
        .unwrap_or(100);
    let out = out.unwrap_or_else(|| PathBuf::from("runs").join(&m.name));
    // A restart under `tessera launch --max-restarts` (or torchelastic)
    // continues the job from its last complete checkpoint, or starts it
    // over where it saved none.
    let (resume, overwrite) = match restart_count() {
        Some(n) if n > 0 && resume.is_none() => match out.join("latest").exists() {
            true => {
                if writer {
                    eprintln!("note: restart {n}: resuming from the last complete checkpoint in {}", out.display());
                }
                (Some(out.clone()), false)
            }
            false => {
                if writer {
                    eprintln!("note: restart {n}: no checkpoint was completed; starting the run over");
                }
                (None, true)
            }
        },
        _ => (resume, overwrite),
    };
    let recorded = match (&recorded, &resume) {
        (None, Some(dir)) => match checkpoint::run_of(dir) {
            Ok(r) => r,
            Err(e) => return fail(&e),
        },
        _ => recorded,
    };
    // Outputs are checked before anything runs.
    if let Some((path, _)) = trace.as_ref().filter(|_| writer) {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        let open = parent
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(path));
        if let Err(e) = open {
            return fail(&format!("cannot write the trace to `{}`: {e}; pass a writable --trace path", path.display()));
        }
    }
    // The run folder: locked for this run, tidied after a killed one, and
    // never taken over silently.
    let _lock = match writer.then(|| checkpoint::lock(&out)).transpose() {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    for done in if writer { checkpoint::recover(&out) } else { Vec::new() } {
        eprintln!("note: {}: {done}", out.display());
    }
    let resuming_here = resume.as_ref().is_some_and(|r| {
        let canon = |p: &Path| p.canonicalize().unwrap_or(p.to_path_buf());
        let (r, o) = (canon(r), canon(&out));
        r == o || r.parent() == Some(o.as_path())
    });
    if writer && checkpoint::holds_run(&out) && !resuming_here {
        if let Some(r) = &resume {
            return fail(&format!(
                "`{}` holds another run; a resume from `{}` needs an --out folder of its own (or that run's folder)",
                out.display(),
                r.display()
            ));
        }
        if !overwrite {
            return fail(&format!(
                "`{}` holds another run (checkpoints or metrics); pass --resume {} to continue it, --overwrite to \
                 replace it, or another --out",
                out.display(),
                out.display()
            ));
        }
        if let Err(e) = checkpoint::clear_run(&out) {
            return fail(&e);
        }
    }
    // A resume continues the recorded run: its seed and data by default.
    let seed = seed.or(recorded.as_ref().map(|r| r.seed)).unwrap_or(t.seed);
    let data = data.or(recorded.as_ref().map(|r| PathBuf::from(&r.data)));
    let axes: Vec<String> = m.parallel.mesh.iter().map(|(a, n)| format!("{a} {n}")).collect();
    if let Some(w) = world.as_ref().filter(|_| writer) {
        eprintln!(
            "note: training on {} processes ({}), one rank each, over {}; rank 0 writes the checkpoints and metrics",
            w.size(),
            axes.join(" × "),
            w.transport
        );
    } else if m.parallel.world() > 1 && world.is_none() {
        eprintln!(
            "note: training on {} simulated ranks ({}): each rank is a thread that runs its own program \
             with its collectives (`tessera inspect FILE --ir rank --rank N` prints one)",
            m.parallel.world(),
            axes.join(" × ")
        );
    }
    let eval_interval = eval_interval.or(t.eval_interval).unwrap_or((steps / 10).max(1));
    let cfg = RunConfig {
        steps,
        out: out.clone(),
        resume,
        seed,
        eval_interval,
        eval_batches: t.eval_steps.unwrap_or(8),
        save_interval: t.save_interval.unwrap_or(0),
        data,
        spec: Some(source.clone()),
        spec_text: None,
        allow_changes,
        backend,
        world: world.clone(),
        timeout,
    };
    let mut trainer = match Trainer::new(training, cfg) {
        Ok(tr) => tr,
        Err(e) => return fail(&e),
    };
    // A model whose inputs the data does not feed trains from code only.
    if let Err(e) = trainer.dataset() {
        return fail(&e);
    }
    if let (Some(r), Some(w)) = (trainer.resumed_pieces, world.as_ref()) {
        eprintln!(
            "note: rank {} resumed from a sharded checkpoint, reading {} of its {} pieces ({:.1} MB)",
            w.rank(),
            r.pieces,
            r.of,
            r.bytes as f64 / 1e6
        );
    }
    for c in &trainer.resume_changes {
        eprintln!("warning: resuming with a change (--allow-changes): {c}");
    }
    // A restart resumes from the run's own checkpoint instead.
    if let Some((path, loaded)) = init
        && trainer.cfg.resume.is_none()
    {
        let absent = loaded.absent(&m.params);
        let naming = loaded.naming.clone();
        // Parameters the file's mapping does not name (a new head) start as
        // a fresh run would draw them.
        let weights = loaded.or_fresh(&m.params, seed);
        if let Err(e) = trainer.set_weights(&weights) {
            return fail(&e);
        }
        if writer {
            eprintln!(
                "note: the weights start from {} (named by {}; {} of {} parameters)",
                path,
                naming,
                weights.len() - absent.len(),
                weights.len()
            );
            if !absent.is_empty() {
                eprintln!(
                    "note: {} parameter(s) are not in {} and start fresh: {}",
                    absent.len(),
                    path,
                    absent.join(", ")
                );
            }
        }
    }
    if let Some((_, n)) = &trace {
        trainer.trace = Some(std::sync::Arc::new(tessera_runtime::trace::Trace::new(*n)));
    }
    let metrics_path = out.join("metrics.jsonl");
    // A resume from an older step drops the metrics of the steps it redoes.
    if writer
        && trainer.cfg.resume.is_some()
        && let Err(e) = truncate_metrics(&metrics_path, trainer.step)
    {
        return fail(&e);
    }
    let mut metrics = match writer.then(|| std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path)) {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(e)) => return fail(&format!("cannot open `{}`: {e}", metrics_path.display())),
    };
    let first = trainer.step;
    let bar = if writer { indicatif::ProgressBar::new(steps) } else { indicatif::ProgressBar::hidden() };
    bar.set_position(first.min(steps));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let mut last_val = None;
    // A non-finite step says its step itself; other errors get where they happened.
    let stop = |bar: &indicatif::ProgressBar, e: tessera_runtime::train::TrainError, at: String| {
        bar.abandon();
        match e {
            tessera_runtime::train::TrainError::NonFinite(_) => launch::stop(world.as_ref(), &e.to_string()),
            _ => launch::stop(world.as_ref(), &format!("{at}: {e}")),
        }
    };
    while trainer.step < steps {
        let mut report = match trainer.train_step() {
            Ok(r) => r,
            Err(e) => return stop(&bar, e, format!("at step {}", trainer.step + 1)),
        };
        if report.step % trainer.cfg.eval_interval == 0 || report.step == steps {
            match trainer.evaluate(trainer.cfg.eval_batches) {
                Ok(v) => {
                    report.val_loss = Some(v);
                    last_val = Some(v);
                }
                Err(e) => return stop(&bar, e, "in evaluation".into()),
            }
        }
        if let Some(f) = metrics.as_mut() {
            let _ = writeln!(f, "{}", serde_json::to_string(&report).unwrap_or_default());
        }
        let val = last_val.map(|v| format!("  val {v:.4}")).unwrap_or_default();
        // Under a batch ramp-up the batch grows; say where it stands.
        let batch =
            if trainer.training.train.rampup.is_some() { format!("  batch {}", report.batch) } else { String::new() };
        bar.set_message(format!(
            "loss {:.4}{val}  lr {:.2e}{batch}  {:.0} tok/s",
            report.loss, report.lr, report.tokens_per_s
        ));
        bar.set_position(report.step);
        let save_now = trainer.cfg.save_interval > 0 && report.step % trainer.cfg.save_interval == 0;
        if (save_now || report.step == steps)
            && let Err(e) = trainer.save_in_background()
        {
            bar.abandon();
            return launch::stop(world.as_ref(), &format!("saving a checkpoint: {e}"));
        }
    }
    // The last checkpoint is written in the background: the run ends when it is complete.
    if let Err(e) = trainer.finish_saving() {
        bar.abandon();
        return launch::stop(world.as_ref(), &format!("saving a checkpoint: {e}"));
    }
    bar.finish();
    let secs = started.elapsed().as_secs_f64();
    if let Some((path, _)) = trace.as_ref().filter(|_| writer) {
        match trainer.write_trace(path) {
            Ok(()) => eprintln!("trace: {} (open it in ui.perfetto.dev or chrome://tracing)", path.display()),
            Err(e) => {
                eprintln!("error writing the trace: {e}");
                return ExitCode::from(1);
            }
        }
    }
    // A short sample from the trained model (byte-level models print as text).
    if let Ok(sample_model) = recheck_for_sampling(&source.0, &source.1) {
        let cfg = tessera_runtime::infer::SampleConfig {
            tokens: 200,
            temperature: 0.8,
            top_k: None,
            top_p: None,
            seed: 0,
            kv_cache: true,
            stop: None,
        };
        // Every process takes part in assembling the weights; rank 0 samples.
        if let Ok(weights) = trainer.weights()
            && writer
            && let Ok(programs) = tessera_compiler::driver::compile_one_sequence(&sample_model, Default::default())
            && let Ok(ids) = tessera_runtime::infer::generate(&programs, &weights, &[u32::from(b'\n')], &cfg)
            && let Ok(tok) = tokenizer_of(&sample_model)
        {
            println!("--- sample ---\n{}\n--------------", tok.decode(&ids));
        }
    }
    if !writer {
        return ExitCode::SUCCESS;
    }
    // A classifier on labelled examples: its accuracy on the whole validation split.
    let accuracy = match trainer.val_accuracy(&m) {
        Ok(Some((right, n))) => {
            if let Some(f) = metrics.as_mut() {
                let line = json!({"step": trainer.step, "val_accuracy": right as f64 / n as f64, "val_examples": n});
                let _ = writeln!(f, "{line}");
            }
            format!("; validation accuracy {:.1}% ({right} of {n})", 100.0 * right as f64 / n as f64)
        }
        Ok(None) => String::new(),
        Err(e) => return fail(&format!("cannot measure the validation accuracy: {e}")),
    };
    println!(
        "trained {} steps in {:.1} s; validation loss {}{accuracy}; checkpoint and metrics in {}",
        steps - first.min(steps),
        secs,
        last_val.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into()),
        out.display()
    );
    ExitCode::SUCCESS
}

/// The spec checked again for one sequence at a time.
/// Which restart of a job this process belongs to, as torchelastic (and
/// `tessera launch --max-restarts`) says: 0 for the first attempt.
fn restart_count() -> Option<u64> {
    std::env::var("TORCHELASTIC_RESTART_COUNT").ok()?.trim().parse().ok()
}

/// Keep the metrics records of steps up to `step` (a resume redoes the rest).
fn truncate_metrics(path: &Path, step: u64) -> Result<(), String> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_none_or(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept.len() == text.len() {
        return Ok(());
    }
    tessera_runtime::train::checkpoint::write_atomic(path, kept.as_bytes()).map_err(|e| e.to_string())
}

fn recheck_for_sampling(spec: &std::path::Path, overrides: &[String]) -> Result<Model, ExitCode> {
    let mut sources = SourceMap::new();
    let opts = Options { overrides: overrides.to_vec(), model: None, micro_batch: Some(1) };
    tessera_compiler::check_path(&mut sources, spec, &opts).map_err(|d| {
        write_diags(&sources, &d.0, &mut codespan_stderr());
        ExitCode::from(1)
    })
}

/// The model of a checkpoint: checked from `spec`, else from the spec and
/// overrides the checkpoint records.
fn model_of(checkpoint: &Path, spec: Option<PathBuf>) -> Result<Model, ExitCode> {
    let (recorded, overrides) = match tessera_runtime::train::checkpoint::is_checkpoint(checkpoint) {
        true => tessera_runtime::train::checkpoint::spec_of(checkpoint).map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(1)
        })?,
        false => (None, Vec::new()),
    };
    let Some(spec) = spec.or(recorded.filter(|r| r.is_file())) else {
        eprintln!("error: {} does not record a spec that is still there; pass --spec FILE", checkpoint.display());
        return Err(ExitCode::from(1));
    };
    recheck_for_sampling(&spec, &overrides)
}

/// `tessera merge`: a LoRA run's weights with its adapters folded in.
fn merge(checkpoint: &Path, out: &Path, spec: Option<PathBuf>) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    };
    let m = match model_of(checkpoint, spec) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let pairs = m.params.iter().filter(|p| p.adapter_of.is_some()).count() / 2;
    if pairs == 0 {
        return fail(&format!("`{}` has no LoRA adapters to merge (its spec sets no `train.lora`)", m.name));
    }
    let weights = match tessera_runtime::weights::read(checkpoint, &m).and_then(|l| l.every(&m.params, checkpoint)) {
        Ok(w) => w,
        Err(e) => return fail(&e),
    };
    let merged = match tessera_runtime::lora::merged(&m, &weights) {
        Ok(w) => w,
        Err(e) => return fail(&e),
    };
    let base = tessera_runtime::lora::base_params(&m);
    match tessera_runtime::train::checkpoint::write_params(out, &base, &merged) {
        Ok(()) => {
            eprintln!("wrote {} ({} parameters, {pairs} adapter pairs folded in)", out.display(), base.len());
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// `tessera export`: a checkpoint's weights through the spec's mapping `to`.
fn export(checkpoint: &Path, to: &str, out: &Path, spec: Option<PathBuf>) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    };
    let m = match model_of(checkpoint, spec) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let Some(map) = m.weights.iter().find(|w| w.format == to) else {
        let have: Vec<String> = m.weights.iter().map(|w| format!("`{}`", w.format)).collect();
        return fail(&format!(
            "the spec has no `weights {to} for {}` mapping ({}); add one (docs/inference.md)",
            m.name,
            if have.is_empty() { "it has none".to_string() } else { format!("it has {}", have.join(", ")) }
        ));
    };
    if map.config.is_empty() {
        return fail(&format!(
            "`weights {to} for {}` has no `config {{ ... }}`: export writes a Hugging Face checkpoint \
             (safetensors and config.json), so the mapping must say its config.json",
            map.model
        ));
    }
    let weights = match tessera_runtime::weights::read(checkpoint, &m).and_then(|l| l.every(&m.params, checkpoint)) {
        Ok(w) => w,
        Err(e) => return fail(&e),
    };
    // A LoRA run exports its merged weights: what the adapters learned is in them.
    let (params, weights) = match m.params.iter().any(|p| p.adapter_of.is_some()) {
        true => match tessera_runtime::lora::merged(&m, &weights) {
            Ok(w) => {
                eprintln!("note: the adapters are folded into their weights (W + alpha/rank · A·B)");
                (tessera_runtime::lora::base_params(&m), w)
            }
            Err(e) => return fail(&e),
        },
        false => (m.params.clone(), weights),
    };
    match tessera_runtime::weights::export_hf(out, map, &params, &weights) {
        Ok(left) => {
            let written = map.rules.iter().filter(|r| r.target.is_some()).count();
            eprintln!(
                "wrote {} and config.json ({written} mapping rules, {} of {} parameters)",
                out.join("model.safetensors").display(),
                params.len() - left.len(),
                params.len()
            );
            if !left.is_empty() {
                eprintln!(
                    "note: `weights {to}` does not name {} parameter(s), not written: {}",
                    left.len(),
                    left.join(", ")
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// The model's tokenizer (its `train.tokenizer`, bytes by default).
fn tokenizer_of(m: &Model) -> Result<tessera_runtime::train::tokenizer::Tokenizer, ExitCode> {
    tessera_runtime::train::tokenizer::Tokenizer::by_name(m.train.as_ref().and_then(|t| t.tokenizer.as_deref()))
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(1)
        })
}

/// `tessera sample`'s choices; those not given come from the spec's `infer` section.
struct SampleFlags {
    tokens: usize,
    temperature: Option<f64>,
    top_k: Option<usize>,
    top_p: Option<f64>,
    seed: Option<u64>,
    kv_cache: bool,
}

impl SampleFlags {
    /// The spec's sampling settings, with every flag given put over them.
    fn over(&self, spec: &tessera_runtime::infer::SampleConfig) -> tessera_runtime::infer::SampleConfig {
        tessera_runtime::infer::SampleConfig {
            tokens: self.tokens,
            temperature: self.temperature.unwrap_or(spec.temperature),
            top_k: self.top_k.or(spec.top_k),
            top_p: self.top_p.or(spec.top_p),
            seed: self.seed.unwrap_or(spec.seed),
            kv_cache: self.kv_cache,
            stop: spec.stop,
        }
    }
}

/// What `sample` reads its weights from.
enum Weights {
    /// A run or `step-*` folder, which records its spec.
    Checkpoint(PathBuf),
    /// A weights file named by parameter paths (`--weights`, with `--spec`).
    File(Vec<PathBuf>),
}

/// A model loaded to generate or embed from: checked for one sequence, its
/// weights, its tokenizer, and the spec and overrides it was checked from.
struct Loaded {
    m: Model,
    params: Vec<tessera_runtime::tensor::Tensor<f32>>,
    tok: tessera_runtime::train::tokenizer::Tokenizer,
    spec: PathBuf,
    overrides: Vec<String>,
}

impl Loaded {
    /// The model checked again for `batch` sequences at a time.
    fn with_batch(&self, batch: u64) -> Result<Model, ExitCode> {
        let mut sources = SourceMap::new();
        let opts = Options { overrides: self.overrides.clone(), model: None, micro_batch: Some(batch) };
        tessera_compiler::check_path(&mut sources, &self.spec, &opts).map_err(|d| {
            write_diags(&sources, &d.0, &mut codespan_stderr());
            ExitCode::from(1)
        })
    }
}

/// Load what `sample` and `serve` run: the spec (given, or the one the
/// checkpoint records), every parameter's weights, and the tokenizer (the
/// spec's, else the one a weights file carries).
fn load_weights(from: &Weights, spec: Option<PathBuf>) -> Result<Loaded, ExitCode> {
    use tessera_runtime::train::checkpoint;
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    };
    let (checkpoint, (recorded, overrides)) = match from {
        Weights::Checkpoint(c) => (c, checkpoint::spec_of(c).map_err(|e| fail(&e))?),
        Weights::File(w) => (&w[0], (None, Vec::new())),
    };
    let spec = match (spec, recorded) {
        (Some(s), _) => s,
        (None, Some(r)) if r.is_file() => r,
        (None, Some(r)) => {
            return Err(fail(&format!(
                "the checkpoint was trained with the spec `{}`, which is no longer there; pass --spec FILE",
                r.display()
            )));
        }
        (None, None) => return Err(fail(&"the checkpoint does not record its spec; pass --spec FILE")),
    };
    let m = recheck_for_sampling(&spec, &overrides)?;
    let loaded = match from {
        Weights::File(paths) => tessera_runtime::weights::read_parts(paths, &m),
        Weights::Checkpoint(c) => tessera_runtime::weights::read(c, &m),
    }
    .map_err(|e| fail(&e))?;
    // Adapters a file lacks start as a fresh run draws them: B = 0, no change to their weights.
    let absent: Vec<&str> = loaded
        .absent(&m.params)
        .into_iter()
        .filter(|a| m.params.iter().any(|p| p.path == *a && p.adapter_of.is_none()))
        .collect();
    if !absent.is_empty() {
        return Err(fail(&format!(
            "{} does not hold {} of the model's parameters ({}), and generation needs them all: fine-tune from it \
             first (`tessera train --init`)",
            checkpoint.display(),
            absent.len(),
            absent.join(", ")
        )));
    }
    let params = loaded.or_fresh(&m.params, 0);
    let tok = match (&from, m.train.as_ref().and_then(|t| t.tokenizer.as_deref())) {
        (Weights::File(w), None) => match tessera_runtime::train::tokenizer::Tokenizer::of_weights(&w[0]) {
            Some(t) => t.map_err(|e| fail(&e))?,
            None => tokenizer_of(&m)?,
        },
        _ => tokenizer_of(&m)?,
    };
    Ok(Loaded { m, params, tok, spec, overrides })
}

fn sample(from: &Weights, spec: Option<PathBuf>, prompt: &str, flags: &SampleFlags) -> Result<String, ExitCode> {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    };
    let Loaded { m, params, tok, .. } = load_weights(from, spec)?;
    let ids = tok.encode(prompt).map_err(|e| fail(&e))?;
    let vocab = m.const_value("vocab").unwrap_or(f64::INFINITY);
    if let Some((i, &id)) = ids.iter().enumerate().find(|&(_, &id)| id as f64 >= vocab) {
        return Err(fail(&format!(
            "the prompt's token {i} has id {id} (byte {id:#04x} for a byte-level model), outside the model's \
             vocabulary of {vocab} tokens; use only tokens below {vocab}"
        )));
    }
    // Generation ends at the model's end of sequence, where its tokenizer names one.
    let cfg = &flags.over(&tessera_runtime::infer::SampleConfig {
        stop: tok.eos(),
        ..tessera_runtime::infer::SampleConfig::of_spec(m.infer.as_ref())
    });
    let programs = tessera_compiler::driver::compile_one_sequence(&m, Default::default()).map_err(|e| fail(&e))?;
    let mut g = tessera_runtime::infer::Generator::new(programs, &params).map_err(|e| fail(&e))?;
    if let (true, Some(why)) = (cfg.kv_cache, g.no_step()) {
        eprintln!("note: no KV cache for `{}`, every token recomputes the context: {why}", m.name);
    }
    let start = std::time::Instant::now();
    let out = g.generate(&ids, cfg).map_err(|e| fail(&e))?;
    eprintln!(
        "generated {} tokens in {:.3} s after a prompt of {} tokens",
        out.len(),
        start.elapsed().as_secs_f64(),
        ids.len()
    );
    Ok(tok.decode(&out))
}

/// Matrix-multiply GFLOP/s of the GEMM library on this machine (f32, n×n×n).
fn gemm_gflops(n: usize) -> f64 {
    use tessera_compiler::model::Dim;
    use tessera_runtime::tensor::Tensor;
    let a = Tensor::<f32>::from_fn(&[Dim::new("i", n as u64), Dim::new("k", n as u64)], |i| (i % 7) as f32);
    let b = Tensor::<f32>::from_fn(&[Dim::new("k", n as u64), Dim::new("j", n as u64)], |i| (i % 5) as f32);
    let out = [Dim::new("i", n as u64), Dim::new("j", n as u64)];
    let _ = tessera_runtime::exec::kernels::einsum(&a, &b, &out);
    let reps = 5;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        std::hint::black_box(tessera_runtime::exec::kernels::einsum(&a, &b, &out));
    }
    2.0 * (n * n * n) as f64 * reps as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// The PyTorch peer's tokens/s for the bench model `name` (same steps and threads).
fn pytorch_peer(python: &Path, name: &str, steps: u64, threads: usize) -> Result<f64, String> {
    let model = match name {
        "tiny" => "tiny",
        "moe_tiny" => "moe-tiny",
        "small" => "small",
        other => {
            return Err(format!(
                "the PyTorch peer has only the bench models `tiny`, `moe_tiny` and `small` (specs/bench/), not `{other}`"
            ));
        }
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/pytorch/train_bench.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(["--model", model, "--steps", &steps.to_string(), "--threads", &threads.to_string()])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Err(format!(
            "{} {} failed: {}\n  help: the peer needs PyTorch (see benches/README.md)",
            python.display(),
            script.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = text
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("the PyTorch peer printed no JSON line: {text}"))?;
    v["tokens_per_s"].as_f64().ok_or_else(|| format!("no `tokens_per_s` in the peer's output: {v}"))
}

/// `tessera bench`'s options.
struct BenchArgs {
    steps: u64,
    json: bool,
    data: Option<PathBuf>,
    pytorch: Option<PathBuf>,
    rounds: u64,
    peak_per_core: Option<f64>,
    backend: tessera_runtime::train::Engine,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// Untimed steps before each timed run (the PyTorch peer's default too).
const WARMUP: u64 = 2;

fn bench(m: Model, args: BenchArgs) -> ExitCode {
    use tessera_runtime::train::{RunConfig, Trainer};
    let BenchArgs { steps, json, data, pytorch, rounds, peak_per_core, backend } = args;
    let rounds = rounds.max(1);
    let flops_per_token = cost::flops_per_token_train(&m);
    let name = m.name.clone();
    let cfg = RunConfig {
        steps: steps + WARMUP,
        seed: 1,
        data,
        backend,
        ..RunConfig::new(std::env::temp_dir().join(format!("tessera-bench-{}", std::process::id())))
    };
    let threads = tessera_runtime::exec::threads();
    let mut last = 0.0;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut tokens = 0;
    let (mut compile_s, mut arena, mut regions) = (Vec::new(), Vec::new(), 0u64);
    let mut jit = None;
    // Every round starts from the initial weights, as the peer does: an MoE's
    // work depends on how its router spreads tokens, which changes as it trains.
    for _ in 0..rounds {
        let t0 = std::time::Instant::now();
        let available = tessera_runtime::train::memory::available_bytes();
        let made = tessera_compiler::driver::compile_training(&m, available)
            .map_err(|e| e.to_string())
            .and_then(|training| Trainer::new(training, cfg.clone()).map_err(|e| e.to_string()));
        let mut t = match made {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
        // Setting up: the data, every pass to the lowered programs, the ranks
        // (with the JIT's compilation of their kernels, in the first round).
        compile_s.push(t0.elapsed().as_secs_f64());
        if jit.is_none() {
            jit = Some(tessera_runtime::backend::jit::stats());
        }
        arena = t.training.step.programs.iter().map(|p| p.arena_bytes()).collect::<Vec<_>>();
        regions = t.training.step.programs.iter().map(|p| p.total_bytes()).sum::<u64>();
        tokens = t.tokens_per_step() * steps.max(1);
        let mut start = std::time::Instant::now();
        for k in 0..WARMUP + steps.max(1) {
            if k == WARMUP {
                start = std::time::Instant::now();
            }
            match t.train_step() {
                Ok(r) => last = r.loss,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            }
        }
        ours.push(tokens as f64 / start.elapsed().as_secs_f64());
        drop(t);
        if let Some(py) = &pytorch {
            match pytorch_peer(py, &name, steps.max(1), threads) {
                Ok(p) => theirs.push(p),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            }
        }
    }
    let peak_rss = tessera_runtime::train::memory::peak_rss_bytes();
    let tps = median(&ours);
    let secs = tokens as f64 / tps;
    let gflops = tps * flops_per_token / 1e9;
    let gemm = gemm_gflops(1024);
    let cpu = tessera_runtime::exec::peak::cpu_model();
    let (peak, how) = match peak_per_core {
        Some(p) => (p * threads as f64, format!("{threads} cores × {p}, as given")),
        None => (
            tessera_runtime::exec::peak::fp32_peak_gflops(threads),
            format!("measured: an FMA loop on {threads} cores of this {cpu}"),
        ),
    };
    let peer = (!theirs.is_empty()).then(|| median(&theirs));
    if json {
        let mut j = json!({
            "model": name, "steps": steps, "tokens_per_s": tps, "gflops": gflops, "step_time_s": secs / steps.max(1) as f64,
            "flops_per_token_train": flops_per_token, "gemm_gflops_1024": gemm, "peak_gflops": peak,
            "peak_measured": peak_per_core.is_none(), "cpu": cpu,
            "threads": threads, "final_loss": last,
        });
        j["rounds"] = json!(rounds);
        j["tokens_per_s_rounds"] = json!(ours);
        j["setup_s"] = json!(median(&compile_s));
        j["arena_bytes"] = json!(arena);
        j["region_bytes"] = json!(regions);
        j["peak_rss_bytes"] = json!(peak_rss);
        j["backend"] = json!(backend.name());
        if let (tessera_runtime::train::Engine::Jit, Some((kernels, secs))) = (backend, jit) {
            j["jit_kernels"] = json!(kernels);
            j["jit_compile_s"] = json!(secs);
        }
        if let Some(p) = peer {
            j["pytorch_tokens_per_s"] = json!(p);
            j["pytorch_tokens_per_s_rounds"] = json!(theirs);
            j["ratio"] = json!(tps / p);
        }
        println!("{j}");
    } else {
        println!(
            "{name}: {tps:.0} tokens/s, {gflops:.1} GFLOP/s achieved ({:.3} s/step over {steps} steps, {threads} threads)",
            secs / steps.max(1) as f64
        );
        if let Some(p) = peer {
            println!("PyTorch peer: {p:.0} tokens/s; Tessera/PyTorch = {:.2}", tps / p);
        }
        println!(
            "set up in {:.0} ms (the data, every pass to the lowered programs, the ranks); arena {} per rank",
            median(&compile_s) * 1e3,
            arena.iter().map(|b| format!("{:.1} MB", *b as f64 / 1e6)).collect::<Vec<_>>().join(", ")
        );
        match (backend, jit) {
            (tessera_runtime::train::Engine::Jit, Some((kernels, secs))) => println!(
                "kernels: cranelift JIT, {kernels} distinct kernels compiled in {:.0} ms (in the set-up)",
                secs * 1e3
            ),
            _ => println!("kernels: the kernel-IR interpreter (--backend interp)"),
        }
        if let Some(rss) = peak_rss {
            println!(
                "peak RSS {:.1} MB; every rank's regions (weights, gradients, optimizer state, io, arena) {:.1} MB",
                rss as f64 / 1e6,
                regions as f64 / 1e6
            );
        }
        if rounds > 1 {
            let list = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
            println!("medians of {rounds} alternating rounds; Tessera: {}", list(&ours));
            if !theirs.is_empty() {
                println!("  PyTorch: {}", list(&theirs));
            }
        }
        println!(
            "GEMM 1024³ f32: {gemm:.1} GFLOP/s = {:.0}% of the {peak:.0} GFLOP/s peak ({how})",
            100.0 * gemm / peak
        );
    }
    ExitCode::SUCCESS
}
