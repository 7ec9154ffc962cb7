r"""Times a ddlr train step against a uniform one, side by side in one process.

  .venv/bin/python -m scripts.benchmark --model=small_cnn --steps=30
  .venv/bin/python -m scripts.benchmark --model=resnet18 --batch_size=128 --steps=5 \
    --variants=uniform,jvp/momentum,jvp/split,jvp/reference@4

For one model, batch and random data held on the device, every variant's
jitted train step is compiled, warmed up, and timed step by step (each step
waits for its result); the variants take turns in `--rounds` rounds of
consecutive steps so that load changes on the machine affect them alike. It
prints, per variant, the mean step time, its ratio to the uniform step (SGD
with momentum, same model and batch: the median over rounds of the ratio of
the two means within a round, with the lowest and highest in brackets), and
three figures of XLA's analysis of the compiled step with
their ratios to the uniform step's: floating-point operations, the temporary
(working) memory, and the peak, which adds the whole train state, the batch's
ids and the outputs but not the dataset that all variants share. Below the
table, each timed variant that caches its reference gradient (`@k` with
k > 1) gets a line with the mean time of one refresh, over the refreshes of
both warm-up and timed steps, and how many of them came in warm-up steps.
"""

import dataclasses
import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import default
from ddlr import references, steps, train
from ddlr.models import MODELS, create_model, model_arguments

# Input shapes of the datasets each model is benchmarked on.
INPUT_SHAPES = {"small_cnn": (28, 28, 1)}
DEFAULT_INPUT_SHAPE = (32, 32, 3)
NUM_INSTANCES, NUM_REFERENCE, NUM_CLASSES = 4096, 1000, 10
PATHS = ("jvp", "layerwise", "vmap", "direct-jvp")

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "small_cnn", sorted(MODELS), "Model name from ddlr.models.MODELS.")
flags.DEFINE_integer(
  "width",
  0,
  "Model width, for models with a width option. 0 keeps the model's default.",
  lower_bound=0,
)
flags.DEFINE_bool(
  "batch_norm", False, "Add BatchNorm to a model that offers it as an option (small_cnn)."
)
flags.DEFINE_integer(
  "batch_size",
  128,
  f"Training batch size, at most the {NUM_INSTANCES} random training instances. Variants "
  "with a split reference need at least 2, one example per half.",
  lower_bound=1,
  upper_bound=NUM_INSTANCES,
)
flags.DEFINE_integer(
  "steps",
  32,
  "Timed steps per variant, shared out among the rounds and rounded up so that each round "
  "gets the same number, a multiple of every refresh interval k.",
  lower_bound=1,
)
# At least 1, because the first call of a compiled step also sets up jax's
# dispatch of it: about 15 ms against 1 ms for later calls of a small step.
flags.DEFINE_integer("warmup", 3, "Untimed steps per variant and round.", lower_bound=1)
flags.DEFINE_integer("rounds", 4, "Rounds in which the variants take turns.", lower_bound=1)
flags.DEFINE_list(
  "variants",
  [
    "uniform",
    "jvp/momentum",
    "jvp/split",
    "jvp/reference",
    "jvp/reference@4",
    "layerwise/momentum",
    "layerwise/split",
    "layerwise/reference@4",
    "vmap/momentum",
    "direct-jvp/momentum",
  ],
  "Variants: 'uniform', or '<path>/<reference>[@k]' with path jvp, layerwise, vmap or "
  "direct-jvp (jax.vjp plus a separate jax.jvp) and k the reference refresh interval. "
  "Reference 'split-half' is 'split' with split_batch_stats='half', which differs from "
  "'split' only on a model with BatchNorm. 'split-seq' and 'split-half-seq' add "
  "split_sequential=True. "
  "layerwise needs a model without BatchNorm. vmap forms B per-example gradients, so its "
  "steps take minutes on a CPU.",
)
flags.DEFINE_list(
  "memory_only",
  [],
  "Variants (same format) that are compiled for their memory analysis but not timed, e.g. "
  "vmap/momentum on ResNet-18, whose per-example gradients make a CPU step take minutes. "
  "A variant listed here must not be in --variants, which lists vmap/momentum by default.",
)


@dataclasses.dataclass
class Variant:
  """One train step configuration to time."""

  name: str
  settings: steps.StepSettings


def parse_variant(name: str) -> Variant:
  """Returns the Variant named `name`, e.g. 'jvp/reference@4'.

  Raises:
    ValueError: for a name other than 'uniform' or '<path>/<reference>[@k]'
      with a known path and reference, and k >= 1 only after 'reference'.
  """
  if name == "uniform":
    return Variant(name, steps.StepSettings(enabled=False))
  path, slash, reference = name.partition("/")
  reference, at, every = reference.partition("@")
  split_batch_stats = "batch"
  split_sequential = False
  if reference in ("split-seq", "split-half-seq"):
    reference, split_sequential = reference.removesuffix("-seq"), True
  if reference == "split-half":
    reference, split_batch_stats = "split", "half"
  problem = None
  if not slash:
    problem = "expected 'uniform' or '<path>/<reference>[@k]'"
  elif path not in PATHS:
    problem = f"unknown path {path!r}, expected one of {', '.join(PATHS)}"
  elif reference not in references.REFERENCES:
    known = ", ".join((*references.REFERENCES, "split-half", "split-seq", "split-half-seq"))
    problem = f"unknown reference {reference!r}, expected one of {known}"
  elif at and reference != "reference":
    # Only the `reference` reference reuses its gradient between refreshes.
    problem = "a refresh interval '@k' applies only to the reference 'reference'"
  elif at and not (every.isascii() and every.isdecimal() and int(every) >= 1):
    # isdecimal alone accepts the digits of other scripts, such as '٣', so isascii comes first.
    problem = f"the refresh interval after '@' must be a whole number >= 1, not {every!r}"
  if problem:
    raise ValueError(f"invalid variant {name!r}: {problem}.")
  settings = steps.StepSettings(
    reference=reference,
    split_batch_stats=split_batch_stats,
    split_sequential=split_sequential,
    alignment="jvp" if path == "direct-jvp" else path,
    linearize=path != "direct-jvp",
    reference_every_steps=int(every or 1),
  )
  return Variant(name, settings)


def timed_variants(names: list[str]) -> list[Variant]:
  """Parses the --variants names, with the uniform step first whether listed or not."""
  names = ["uniform"] + [name for name in names if name != "uniform"]
  return [parse_variant(name) for name in names]


def check_variant_names(names: list[str]) -> None:
  """Raises flags.ValidationError unless each of `names` is a valid variant, listed once."""
  for name in names:
    try:
      parse_variant(name)
    except ValueError as error:
      raise flags.ValidationError(str(error)) from error
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise flags.ValidationError(
      f"duplicate variant {', '.join(repeated)}, expected each variant once."
    )


def has_option(model_name: str, option: str) -> bool:
  """Returns whether the constructor of model `model_name` takes the argument `option`."""
  return option in model_arguments(model_name)


def check_model_option(model_name: str, option: str, value) -> bool:
  """Raises flags.ValidationError when `value` is set for a model without `option`."""
  if value and not has_option(model_name, option):
    models = ", ".join(name for name in sorted(MODELS) if has_option(name, option))
    raise flags.ValidationError(
      f"{model_name} has no {option} option, so remove --{option} or pick a model that has "
      f"one: {models}."
    )
  return True


# absl runs these validators when it parses the flags, before `main` starts.
@flags.validator("variants")
def check_variants(names: list[str]) -> bool:
  if not names:
    raise flags.ValidationError("expected at least one variant, e.g. --variants=uniform.")
  check_variant_names(names)
  return True


@flags.validator("memory_only")
def check_memory_only(names: list[str]) -> bool:
  check_variant_names(names)
  if "uniform" in names:
    raise flags.ValidationError(
      "the uniform step is always timed, so remove it from --memory_only."
    )
  return True


@flags.multi_flags_validator(["variants", "memory_only"])
def check_variant_lists_disjoint(values) -> bool:
  both = [name for name in values["memory_only"] if name in values["variants"]]
  if both:
    raise flags.ValidationError(
      f"--variants and --memory_only both list {', '.join(both)}. List each variant in one of them."
    )
  return True


@flags.multi_flags_validator(["batch_size", "variants", "memory_only"])
def check_split_batch_size(values) -> bool:
  split = []
  for name in values["variants"] + values["memory_only"]:
    try:
      settings = parse_variant(name).settings
    except ValueError:
      continue  # check_variants and check_memory_only report the invalid name.
    if settings.enabled and settings.reference in references.SPLIT_REFERENCES:
      split.append(name)
  if split and values["batch_size"] < 2:
    raise flags.ValidationError(
      f"variants with a split reference ({', '.join(split)}) score each half of the batch "
      "against the other half, so they need --batch_size >= 2."
    )
  return True


@flags.multi_flags_validator(["model", "width"])
def check_width(values) -> bool:
  return check_model_option(values["model"], "width", values["width"])


@flags.multi_flags_validator(["model", "batch_norm"])
def check_batch_norm(values) -> bool:
  return check_model_option(values["model"], "batch_norm", values["batch_norm"])


def build_step(variant: Variant, model, device_data, batch_size: int):
  """Returns the jitted step of `variant`, its initial state and its compiled memory."""
  config = default.get_config()
  config.ddlr.enabled = variant.settings.enabled
  learning_rate = train.learning_rate_schedule(config.optimizer, 1000, 100)
  tx = train.build_optimizer(
    config, num_instances=NUM_INSTANCES, num_classes=NUM_CLASSES, learning_rate=learning_rate
  )
  settings = variant.settings
  cache = references.caches_reference(settings)
  state = train.create_train_state(
    model, tx, device_data.train_images[:1], jax.random.key(0), cache_reference=cache
  )
  step = jax.jit(
    functools.partial(steps.train_step, model=model, tx=tx, settings=settings), donate_argnums=0
  )
  ids = jnp.arange(batch_size)
  memory = compiled_memory(step.lower(state, device_data, ids).compile(), (state, ids))
  if not cache:
    return step, state, memory

  # As in the training loop: a separate refresh call after every k-th step.
  refresh = jax.jit(
    functools.partial(references.refresh_reference_direction, model=model, settings=settings),
    donate_argnums=0,
  )
  refresh_memory = compiled_memory(refresh.lower(state, device_data).compile(), state)
  state = refresh(state, device_data)
  every = settings.reference_every_steps
  step_and_refresh = RefreshingStep(step, refresh, every)

  for kind in ("temp", "peak"):
    if memory[kind] is not None and refresh_memory[kind] is not None:
      memory[kind] = max(memory[kind], refresh_memory[kind])
  if memory["flops"] is not None and refresh_memory["flops"] is not None:
    memory["flops"] += refresh_memory["flops"] / every
  return step_and_refresh, state, memory


class RefreshingStep:
  """A train step followed by a refresh of the reference gradient after every k-th call.

  As in the training loop, the refresh is its own jitted call. The step's
  result is ready before the refresh starts, so `refresh_times` contains the
  seconds of each refresh alone. The caller sets `warming_up` during warm-up
  steps, and `warmup_refreshes` counts the refreshes made meanwhile.
  """

  def __init__(self, step, refresh, every: int):
    self.step, self.refresh, self.every = step, refresh, every
    self.calls = 0
    self.refresh_times: list[float] = []
    self.warming_up = False
    self.warmup_refreshes = 0

  def __call__(self, state, device_data, ids):
    """Returns the new state and the step's metrics, refreshing after every k-th call."""
    state, metrics = self.step(state, device_data, ids)
    self.calls += 1
    if self.calls % self.every == 0:
      jax.block_until_ready(state)
      start = time.perf_counter()
      state = jax.block_until_ready(self.refresh(state, device_data))
      self.refresh_times.append(time.perf_counter() - start)
      if self.warming_up:
        self.warmup_refreshes += 1
    return state, metrics


def compiled_memory(compiled, inputs) -> dict[str, int | None]:
  """Returns XLA's cost and memory analysis of a compiled step: FLOPs, and bytes.

  `temp` is the working memory beyond the step's arguments and outputs. `peak`
  estimates the device memory a step needs besides the dataset, which all
  variants share. It adds the bytes of `inputs` (the step's other arguments,
  e.g. train state and ids), the outputs that do not reuse a donated input
  buffer, and `temp`. Every leaf of `inputs` counts, because the train state
  stays on the device whether or not the step reads it. XLA's argument size
  is not used, because jax.jit drops the arguments a step never reads, so it
  would count only the dataset arrays that this step reads.
  """
  costs = compiled.cost_analysis()
  # Older jax versions return one cost dict per computation in a list.
  costs = costs[0] if isinstance(costs, list) else costs
  flops = costs.get("flops") if costs else None
  analysis = compiled.memory_analysis()
  if analysis is None or not hasattr(analysis, "temp_size_in_bytes"):
    return {"temp": None, "peak": None, "flops": flops}
  peak = (
    tree_bytes(inputs)
    + analysis.output_size_in_bytes
    - analysis.alias_size_in_bytes
    + analysis.temp_size_in_bytes
  )
  return {"temp": analysis.temp_size_in_bytes, "peak": peak, "flops": flops}


def tree_bytes(tree) -> int:
  """Returns the bytes of all arrays in `tree`, PRNG key arrays by their key data."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    total += leaf.nbytes
  return total


def time_variants(variants, model, device_data):
  """Returns each variant's step times in seconds, one list per round, and its memory figures.

  Also returns the `RefreshingStep` of each variant that refreshes its
  reference gradient every k steps, by name, with the times of its refreshes.

  Each round runs every variant for a block of consecutive steps, warm-up
  steps first, so a large variant (vmap) does not evict the caches of the step
  timed after it, while load changes between rounds still affect all alike.
  A round's timed steps are a multiple of every variant's refresh interval
  k, so each round has the same share of refresh steps.
  """
  built = {
    variant.name: build_step(variant, model, device_data, FLAGS.batch_size) for variant in variants
  }
  states = {name: entry[1] for name, entry in built.items()}
  batches = [
    jnp.asarray(np.random.default_rng(i).permutation(NUM_INSTANCES)[: FLAGS.batch_size])
    for i in range(FLAGS.warmup + FLAGS.steps)
  ]
  every = math.lcm(*(variant.settings.reference_every_steps for variant in variants))
  per_round = every * -(-FLAGS.steps // (FLAGS.rounds * every))
  print(
    f"{FLAGS.rounds} rounds of {per_round} timed steps after {FLAGS.warmup} warm-up steps "
    "per variant"
  )
  times = {name: [] for name in built}
  for _ in range(FLAGS.rounds):
    for name, (step, _, _) in built.items():
      times[name].append([])
      for index in range(FLAGS.warmup + per_round):
        ids = batches[index % len(batches)]
        if isinstance(step, RefreshingStep):
          step.warming_up = index < FLAGS.warmup
        start = time.perf_counter()
        states[name], metrics = step(states[name], device_data, ids)
        jax.block_until_ready((states[name], metrics))
        if index >= FLAGS.warmup:
          times[name][-1].append(time.perf_counter() - start)
  refreshing = {
    name: step for name, (step, _, _) in built.items() if isinstance(step, RefreshingStep)
  }
  return times, {name: entry[2] for name, entry in built.items()}, refreshing


def main(argv):
  del argv
  # Both lists are parsed before anything is built. The flag validators have
  # already rejected invalid and duplicate names.
  variants = timed_variants(FLAGS.variants)
  memory_only = [parse_variant(name) for name in FLAGS.memory_only]
  config = default.get_config().model
  config.name = FLAGS.model
  if FLAGS.width:
    config.width = FLAGS.width
  else:
    del config.width
  if FLAGS.batch_norm:
    config.batch_norm = True
  else:
    del config.batch_norm
  model = create_model(config, NUM_CLASSES)
  shape = INPUT_SHAPES.get(FLAGS.model, DEFAULT_INPUT_SHAPE)
  rng = np.random.default_rng(0)
  device_data = steps.DeviceData(
    train_images=jnp.asarray(rng.normal(size=(NUM_INSTANCES, *shape)).astype(np.float32)),
    train_labels=jnp.asarray(rng.integers(0, NUM_CLASSES, NUM_INSTANCES).astype(np.int32)),
    reference_images=jnp.asarray(rng.normal(size=(NUM_REFERENCE, *shape)).astype(np.float32)),
    reference_labels=jnp.asarray(rng.integers(0, NUM_CLASSES, NUM_REFERENCE).astype(np.int32)),
  )
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), device_data.train_images[:1], train=False)
  )
  layerwise = [name for name in FLAGS.variants + FLAGS.memory_only if name.startswith("layerwise/")]
  if "batch_stats" in variables and layerwise:
    sys.exit(
      f"error: {FLAGS.model} has BatchNorm, which the layerwise path does not support; "
      f"remove {', '.join(layerwise)} from --variants and --memory_only."
    )
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(f"model: {FLAGS.model}, input {shape}, batch {FLAGS.batch_size}")
  times, memory, refreshing = time_variants(variants, model, device_data)
  for variant in memory_only:
    memory[variant.name] = build_step(variant, model, device_data, FLAGS.batch_size)[2]
  # Means within a round, not medians, so that a variant refreshing its
  # reference gradient every k steps pays its share of the refresh steps.
  uniform_means = np.array([np.mean(steps_in_round) for steps_in_round in times["uniform"]])
  print(
    "| variant | mean step (ms) | vs uniform | GFLOP | vs uniform | temp memory (MiB) "
    "| vs uniform | peak memory (MiB) | vs uniform |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for name, sizes in memory.items():
    rounds = times.get(name)
    if rounds:
      ratios = np.array([np.mean(steps_in_round) for steps_in_round in rounds]) / uniform_means
      spread = f"({np.min(ratios):.2f}-{np.max(ratios):.2f})"
      cells = [f"{1e3 * np.mean(rounds):.1f}", f"{np.median(ratios):.2f}x {spread}"]
    else:
      cells = ["not timed", "n/a"]
    for kind, unit in (("flops", 1e9), ("temp", 2**20), ("peak", 2**20)):
      size, uniform_size = sizes[kind], memory["uniform"][kind]
      cells.append(f"{size / unit:.2f}" if size is not None else "n/a")
      cells.append(f"{size / uniform_size:.2f}x" if size and uniform_size else "n/a")
    print(f"| {name} | " + " | ".join(cells) + " |")
  uniform_step = np.mean(times["uniform"])
  for name, step in refreshing.items():
    if step.refresh_times:
      refresh = np.mean(step.refresh_times)
      print(
        f"{name}: a refresh took {1e3 * refresh:.1f} ms ({refresh / uniform_step:.2f}x the "
        f"uniform step, {refresh / uniform_step / step.every:.2f}x per step), mean of "
        f"{len(step.refresh_times)}, {step.warmup_refreshes} of them in warm-up steps"
      )
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
