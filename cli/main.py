"""`tritnet`: the click application behind the console script.

Commands parse options and call the library (tritnet.train, tritnet.sample, ...). Every error
prints one line on stderr, `tritnet: error: ...`, without a traceback (unless --debug), and
exits 2 when the command line itself is wrong (an unknown command or option, a missing
argument, a value of the wrong type, options that exclude each other), 1 for everything else
(bad data, a bad checkpoint, an invalid config value, no GPU, a refused run folder, a NaN
loss, a full disk); Ctrl-C exits 130.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import warnings

# One OpenBLAS thread unless the user says otherwise; it must be set before NumPy loads.
# NumPy's BLAS only runs attention's small batched matmuls here (the ternary products are
# Numba kernels), and with two OpenBLAS threads on a two-core machine that is busy with
# anything else, their spin-waiting made a tiny-preset step 10-20x slower (measured: 8 s
# instead of 0.5 s under a concurrent pytest); alone, one thread is as fast as two.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click  # noqa: E402

import tritnet  # noqa: E402
from tritnet.errors import TritnetError  # noqa: E402


class DeviceChoice(click.Choice):
    def __init__(self):
        super().__init__(["auto", "cpu", "cuda"])


class _OneLineError(click.ClickException):
    """A click error shown as every tritnet error is: one line, `tritnet: error: ...`."""

    def __init__(self, error: click.ClickException):
        ctx = getattr(error, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        super().__init__(error.format_message() + hint)
        self.exit_code = error.exit_code

    def show(self, file=None):
        click.echo("tritnet: error: " + " ".join(self.format_message().split()), err=True)


@contextlib.contextmanager
def _one_line_errors():
    try:
        yield
    except _OneLineError:
        raise
    except click.ClickException as e:
        raise _OneLineError(e) from None


class _Tritnet(click.Group):
    """The command group: click's own errors (parsing, usage) become one line too."""

    def make_context(self, *args, **kwargs):
        with _one_line_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_errors():
            return super().invoke(ctx)


@click.group(cls=_Tritnet, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(tritnet.__version__, prog_name="tritnet")
def main():
    """tritnet: train true-ternary neural networks (packed trits, integer state, no float weights)."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"tritnet: warning: {message}\n"


def _fail(message: str, code: int = 1):
    click.echo("tritnet: error: " + " ".join(str(message).split()), err=True)
    sys.exit(code)


def user_errors_are_one_line(command):
    """Add --debug, and turn the library's user errors (TritnetError) into one stderr line
    and exit 1."""

    @click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
    @functools.wraps(command)
    def wrapper(*args, debug=False, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("tritnet: interrupted", err=True)
            sys.exit(130)
        except TritnetError as e:
            if debug:
                raise
            _fail(e)
    return wrapper


def echo_json(value):
    """JSON on stdout: one line for a script that reads it, indented for a person (stdout is a
    terminal; inspect's object is 30 KB on one line otherwise)."""
    click.echo(json.dumps(value, indent=2 if sys.stdout.isatty() else None))


def says_when_compiling(command):
    """Say on stderr when the command's first kernel starts compiling (a first run's silent
    minute otherwise; backend.announce_compilation)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from tritnet.backend import announce_compilation
        with announce_compilation(lambda line: click.echo(line, err=True)):
            return command(*args, **kwargs)
    return wrapper


@main.command()
@click.option("--device", type=DeviceChoice(), default=None,
              help="Device to report on (default: TRITNET_DEVICE or the best available).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (one line for scripts, indented on a terminal).")
def info(device, as_json):
    """Print the backend, the device and library versions."""
    from tritnet import backend
    try:
        if device is not None:
            backend.set_device(device)
        facts = {"tritnet": tritnet.__version__, "python": sys.version.split()[0], **backend.describe()}
    except backend.DeviceError as e:
        raise click.ClickException(str(e))
    if as_json:
        echo_json(facts)
    else:
        for k, v in facts.items():
            click.echo(f"{k:>12}: {v}")


@main.command()
@click.option("--preset", "preset_name", default="tiny", show_default=True,
              help="Preset to trace: tiny, small or default.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="A JSON or TOML config file (overrides the preset).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (one line for scripts, indented on a terminal).")
def trace(preset_name, config_path, as_json):
    """Count the logical trits of a model per component, allocating nothing."""
    from tritnet.config import ConfigError, load_config, preset
    from tritnet.models import trace as run_trace
    try:
        config = preset(preset_name)
        if config_path:
            config = load_config(config_path, base=config)
    except ConfigError as e:
        raise click.ClickException(str(e))
    report = run_trace(config)
    if as_json:
        echo_json({"components": report.components, "total": report.total,
                   "state_bytes": report.state_bytes, "seconds": report.seconds})
    else:
        click.echo(report.format())


@main.command()
@click.option("--preset", "preset_name", help="Preset: tiny (default), small or default.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="A JSON or TOML config file (over the preset; flags override it).")
@click.option("--data", "data_path", type=click.Path(),
              help="A text file, a folder of text files, or a .bin of tokens "
                   "(default: the Python standard library's source files).")
@click.option("--dtype", type=click.Choice(["uint8", "uint16"]), help="Token dtype of a .bin.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(dir_okay=False),
              help="Train on the subword tokens of this tokenizer.json (tritnet tokenizer "
              "train); the model's vocab_size follows it. A resumed run keeps its own.")
@click.option("--steps", type=int, help="Training steps.")
@click.option("--tokens", type=int, help="Train on this many tokens instead: "
              "steps = ceil(tokens / (batch size x seq len)).")
@click.option("--batch-size", type=int, help="Sequences per step.")
@click.option("--seq-len", type=int, help="Tokens per sequence.")
@click.option("--flip-threshold", type=int, help="TritFlip: accumulated int8 units that flip a "
              "trit (1..127; larger = slower learning).")
@click.option("--scale-threshold", type=int, help="TritFlip: the same for the row scales.")
@click.option("--decay-shift", type=int, help="TritFlip: accumulator leak, 0 = off (0..7).")
@click.option("--grad-rms-units", type=int, help="TritFlip: int8 units of a one-RMS gradient.")
@click.option("--grad-clip-units", type=int, help="TritFlip: the most units one step's gradient "
              "adds to an accumulator (0 = off; below --flip-threshold, no flip in one step).")
@click.option("--schedule", type=click.Choice(["constant", "cosine"]),
              help="TritFlip: the gain's decay over the run (its learning-rate schedule).")
@click.option("--final-grad-rms-units", type=float,
              help="TritFlip: the gain at the last step under --schedule cosine.")
@click.option("--eval-every", type=int, help="Steps between held-out evaluations (0: at the end).")
@click.option("--save-every", type=int, help="Steps between checkpoints (0: at the end only).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Run folder (default: runs/<preset>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its ckpt.h5.")
@click.option("--overwrite", is_flag=True, help="Start over in --out; the earlier run's files "
              "move to previous-<time>/ inside it.")
@click.option("--seed", type=int, help="Seed of the initial trits, the data order and the "
              "optimiser's rounding.")
@click.option("--device", type=DeviceChoice(), default=None,
              help="auto (default: the GPU if usable, else the CPU), cpu or cuda.")
@click.option("--gpus", type=click.IntRange(min=1), default=None,
              help="Train data-parallel on this many GPUs of this host, one process each "
              "(NCCL). Under a launcher (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) leave "
              "it out.")
@click.option("--micro-batches", type=click.IntRange(min=1), default=None,
              help="Cut each step's batch into this many shards, combined exactly in "
              "integers (a multiple of --gpus; default: one per GPU).")
@click.option("--recompute/--no-recompute", default=None,
              help="Keep one block's activations and recompute each block in backward: the "
              "same training in far less device memory, for a second forward (default: the "
              "preset's).")
@click.option("--recompute-keep", type=click.IntRange(min=0), default=None,
              help="With --recompute, the last N blocks keep their activations instead: "
              "faster steps for the memory that leaves (default: the preset's).")
@click.option("--expert-capacity", type=float, help="The most entries each MoE expert takes, "
              "in fair shares (tokens x top_k / n_experts); entries past it are dropped. 0 "
              "(default): every entry runs.")
@click.option("--cuda-graph/--no-cuda-graph", default=None,
              help="On a GPU, replay each step from CUDA graphs, captured after a few eager "
              "steps: the same training without most of the host's launch time (default: on "
              "where the run allows it: one GPU, one micro-batch).")
@user_errors_are_one_line
def train(preset_name, config_path, data_path, dtype, steps, tokens, batch_size, seq_len,
          flip_threshold, scale_threshold, decay_shift, grad_rms_units, grad_clip_units,
          schedule, final_grad_rms_units, eval_every, save_every, out_dir, resume, overwrite,
          seed, device, gpus, micro_batches, recompute, recompute_keep, expert_capacity,
          cuda_graph, tokenizer_path):
    """Train a model; with no options, the tiny preset on the default corpus.

    The run folder keeps config.json, metrics.jsonl and ckpt.h5 (the latest checkpoint),
    and tokenizer.json for a run on subword tokens.
    """
    from tritnet.backend import announce_compilation
    from tritnet.config import Config, load_config, preset
    from tritnet.tokenizer import load_tokenizer
    from tritnet.train import train as run_train
    if steps is not None and tokens is not None:
        raise click.UsageError("give --steps or --tokens, not both")
    if resume and overwrite:
        raise click.UsageError("--resume continues a run and --overwrite starts a new one: "
                               "give one of them")
    out_dir = out_dir or os.path.join("runs", preset_name or "tiny")
    run_config = os.path.join(out_dir, "config.json")
    if resume and not preset_name and not config_path and os.path.exists(run_config):
        config = load_config(run_config, base=Config())   # continue the run as it was set up
    else:
        config = preset(preset_name or "tiny")
        if config_path:
            config = load_config(config_path, base=config)
    config = config.override(steps=steps, batch_size=batch_size, seq_len=seq_len,
                             flip_threshold=flip_threshold, scale_threshold=scale_threshold,
                             decay_shift=decay_shift, grad_rms_units=grad_rms_units,
                             grad_clip_units=grad_clip_units, schedule=schedule,
                             final_grad_rms_units=final_grad_rms_units,
                             eval_every=eval_every, save_every=save_every, seed=seed,
                             micro_batches=micro_batches, recompute=recompute,
                             recompute_keep=recompute_keep, expert_capacity=expert_capacity,
                             cuda_graph=cuda_graph)
    tokenizer = None
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
        config = config.override(vocab_size=tokenizer.vocab_size)
    with announce_compilation(lambda line: click.echo(line)):
        run_train(config, data=data_path, dtype=dtype, out_dir=out_dir, resume=resume,
                  overwrite=overwrite, device=device, tokens=tokens, gpus=gpus,
                  log=lambda line: click.echo(line), tokenizer=tokenizer)


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (one line for scripts, indented on a terminal).")
@click.option("--no-verify", "no_verify", is_flag=True,
              help="Show what can be read without checking the file first (marked NOT "
              "VERIFIED, with what could not be read; exit 1 only when nothing can be read).")
@user_errors_are_one_line
@says_when_compiling
def inspect(checkpoint, as_json, no_verify):
    """Show what a checkpoint holds: module tree, shapes, dtypes, trits, bytes, config, step.

    The whole file is verified first, as a load would: any damage prints one error line and
    exits 1."""
    from tritnet.checkpoint import CheckpointError, inspect_checkpoint, read_header, \
        render_inspection
    if not no_verify:
        module = read_header(checkpoint)["module"]
        if module != "CodeMemoryLM":
            raise CheckpointError(f"checkpoint {checkpoint} holds a {module}, which tritnet "
                                  "inspect cannot check against its model (it knows "
                                  "CodeMemoryLM); --no-verify shows it unchecked")
    info = inspect_checkpoint(checkpoint, verify=not no_verify)
    if as_json:
        echo_json(info)
    else:
        click.echo(render_inspection(info))


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Where to write the format-2 copy (default: NAME.v2.h5 beside it).")
@user_errors_are_one_line
@says_when_compiling
def upgrade(checkpoint, out_path):
    """Convert a format-1 checkpoint into format 2: a checked copy; the original stays.

    Format 1 has no checksum over its root attributes (config, train_state, ...), so their
    edits cannot be detected: upgrade only files you trust. To resume a run from the copy,
    put it in the run folder as ckpt.h5."""
    from tritnet.checkpoint import upgrade_checkpoint
    out, lost = upgrade_checkpoint(checkpoint, out_path)
    note = ("; the data identity was dropped (format 1 kept no hash of the data), so a resume "
            "from it cannot check --data") if lost else ""
    click.echo(f"wrote {out} (format 2) from {checkpoint}, which is unchanged{note}")


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--prompt", default="\n", help="Text to continue, as UTF-8 bytes or the "
              "model's subword tokens (default: a newline); at most the model's context.")
@click.option("--tokens", "n_tokens", type=click.IntRange(min=0), default=200, show_default=True,
              help="New tokens to generate per sample (fewer where a --stop string ends it).")
@click.option("--num-samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples of the prompt, generated together as one batch.")
@click.option("--temperature", type=float, default=0.8, show_default=True,
              help="Softmax temperature (> 0: sampling); 0 decodes greedily, the most likely "
              "token each step, and takes no --top-k or --top-p.")
@click.option("--top-k", type=int, default=None,
              help="Sample among the k most likely tokens (default 40; 0: all).")
@click.option("--top-p", type=float, default=None,
              help="Sample among the most likely tokens that together reach probability p, "
              "in (0, 1] (default 1: all).")
@click.option("--stop", multiple=True, help="End a sample where it writes this string (not "
              "printed); repeat for several.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--device", type=DeviceChoice(), default=None, help="auto, cpu or cuda.")
@user_errors_are_one_line
def sample(checkpoint, prompt, n_tokens, num_samples, temperature, top_k, top_p, stop, seed,
           device):
    """Generate text from a checkpoint's model (a KV cache; no gradients, the model unchanged).

    The window is the model's context: a longer prompt is refused, and a sample that reaches
    it goes on from its last context/2 tokens (CodeMemoryLM.generate).
    """
    from tritnet.backend import announce_compilation
    from tritnet.models import generation_request
    from tritnet.sample import load_model, read_config
    from tritnet.tokenizer import checkpoint_tokenizer
    config = read_config(checkpoint)
    tokenizer = checkpoint_tokenizer(checkpoint)   # None: the model reads bytes
    if temperature != 0:   # the sampling defaults; at temperature 0 both must be left out
        top_k = 40 if top_k is None else (top_k or None)
    if tokenizer is not None:
        prompts = [[int(t) for t in tokenizer.encode(prompt)]] * num_samples
        stop_ids = [[int(t) for t in tokenizer.encode(s)] for s in stop]
    else:
        prompts, stop_ids = [list(prompt.encode("utf-8"))] * num_samples, stop
    # every option is checked before the model loads: a bad one costs no loading time
    generation_request(config, prompts, n_tokens, temperature, top_k, top_p, stop_ids)
    with announce_compilation(lambda line: click.echo(line, err=True)):
        model, config = load_model(checkpoint, device=device)
        outs = model.generate(prompts, n_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, stop=stop_ids)
    for i, out in enumerate(outs):
        if num_samples > 1:
            click.echo(f"--- sample {i + 1} of {num_samples} ---")
        if tokenizer is not None:
            text = tokenizer.decode(out)
            # the model may write a stop string with other tokens than its encoding's
            ends = [text.find(s) for s in stop if s in text]
            click.echo(prompt + (text[:min(ends)] if ends else text))
        elif config.vocab_size <= 256:   # byte tokens
            click.echo(prompt + bytes(out).decode("utf-8", errors="replace"))
        else:
            click.echo(" ".join(str(t) for t in out))


@main.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", "data_path", type=click.Path(),
              help="Data whose held-out split to score (default: the default corpus, if the "
              "run was trained on it).")
@click.option("--dtype", type=click.Choice(["uint8", "uint16"]), help="Token dtype of a .bin.")
@click.option("--batches", type=click.IntRange(min=0), default=None,
              help="Held-out batches to score (default: the config's eval_batches; 0: all).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None,
              help="Tokens per scored window (default: the training seq_len; at most the "
              "model's context). Each window is scored from its own first token.")
@click.option("--device", type=DeviceChoice(), default=None, help="auto, cpu or cuda.")
@user_errors_are_one_line
@says_when_compiling
def evaluate(checkpoint, data_path, dtype, batches, seq_len, device):
    """Held-out bits per byte of a checkpoint's model, beside the bigram baseline.

    Without --data it scores the default corpus's held-out split, and refuses a checkpoint
    trained on other data (it names that data: pass it, or any data, with --data)."""
    from tritnet.train import evaluate_checkpoint
    score = evaluate_checkpoint(checkpoint, data=data_path, dtype=dtype, batches=batches,
                                seq_len=seq_len, device=device)
    unit = score["unit"]
    other = f" (not its training data, {score['trained_on']})" if score["trained_on"] else ""
    click.echo(f"{checkpoint}: held-out {score['val']:.4f} {unit} on {score['tokens']:,} tokens "
               f"of {score['source']}{other} | bigram baseline {score['bigram']:.4f} {unit}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", "out_path", default="plot.png", show_default=True,
              type=click.Path(dir_okay=False),
              help="The image to write (replaced if it exists): .png, .svg or .pdf.")
@click.option("--x", "x_axis", type=click.Choice(["tokens", "time"]), default="tokens",
              show_default=True, help="What the runs are drawn against: tokens seen, or wall "
              "time.")
@user_errors_are_one_line
def plot(runs, out_path, x_axis):
    """Draw runs' held-out and training bpb, the bigram baseline and tokens/s into one image.

    Each RUN is a run folder (its metrics.jsonl) or a metrics file (.jsonl or .jsonl.gz);
    several are overlaid, one colour each. Needs matplotlib: pip install "tritnet[plot]"."""
    from tritnet.plot import FORMATS, plot_runs, read_metrics
    if os.path.splitext(out_path)[1].lower() not in FORMATS:
        raise click.BadParameter(f"{out_path}: the image format comes from the name; end it "
                                 f"in {', '.join(FORMATS)}", param_hint="-o")
    metrics = [read_metrics(run) for run in runs]
    plot_runs(metrics, out_path, x=x_axis)
    click.echo(f"wrote {out_path}: {len(metrics)} run(s) against {x_axis}")


@main.group()
def tokenizer():
    """Subword tokenizers: byte-level BPE through Hugging Face's tokenizers library."""


@tokenizer.command("train")
@click.option("--data", "data_path", type=click.Path(),
              help="Text to learn from: a text file or a folder of text files (default: the "
              "Python standard library's source files). Only its train split is read.")
@click.option("--vocab-size", type=click.IntRange(257, 65536), default=4096, show_default=True,
              help="Tokens: the 256 bytes and the merges learned (small data may give fewer).")
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The tokenizer.json to write; an existing file is never replaced.")
@user_errors_are_one_line
def tokenizer_train(data_path, vocab_size, out_path):
    """Learn a byte-level BPE tokenizer from text, for `tritnet train --tokenizer FILE`.

    It is learned from the data's train split only (the held-out files stay unseen), so a run
    on the same data scores text its tokenizer never saw."""
    from tritnet import data as tdata
    from tritnet.tokenizer import TokenizerError, save_tokenizer, train_tokenizer
    if os.path.exists(out_path):
        raise TokenizerError(f"{out_path} exists; runs may have been trained with it, so it is "
                             "not replaced: choose another -o, or remove it first")
    corpus = tdata.load_corpus(data_path)
    tok = train_tokenizer(corpus, vocab_size)
    save_tokenizer(tok, out_path)
    held_out = len(corpus.val) / max(len(tok.encode(corpus.val.tobytes())), 1)
    click.echo(f"wrote {out_path}: {tok.describe()}, learned from {len(corpus.train):,} bytes of "
               f"{corpus.source}; {held_out:.2f} bytes a token on its held-out split")


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The .safetensors file to write (replaced if it exists).")
@user_errors_are_one_line
@says_when_compiling
def export(checkpoint, out_path):
    """Write a checkpoint's inference state to one safetensors file: packed trits, int8 scales,
    the code memory's tables and edges, the config and tokenizer as metadata.

    No optimiser state: a fraction of the checkpoint. examples/numpy_inference.py runs it
    with NumPy alone. Needs safetensors: pip install "tritnet[export]"."""
    from tritnet.export import export_checkpoint
    if not out_path.endswith(".safetensors"):
        raise click.BadParameter(f"{out_path}: an export is a .safetensors file; end the name "
                                 "in .safetensors", param_hint="-o")
    sizes = export_checkpoint(checkpoint, out_path)
    click.echo(f"wrote {out_path}: {sizes['tensors']} tensors, {sizes['export_bytes']:,} bytes "
               f"({sizes['export_bytes'] / sizes['checkpoint_bytes']:.1%} of the checkpoint's "
               f"{sizes['checkpoint_bytes']:,})")


if __name__ == "__main__":  # pragma: no cover
    main()
