"""Figure and Markdown table of a `hessian_spectrum.json` record."""

import matplotlib

matplotlib.use("Agg")  # Writes PNG files; no display is needed or assumed.

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _class_label(record: dict, label: str) -> str:
  return f"{label}: {record['class_names'][label]}"


def plot_spectra(record: dict, path: str) -> None:
  """Writes one panel per training point: eigenvalue index on x, one line per class.

  The y axis is logarithmic, so non-positive eigenvalues are left out of the
  plot; the figure's footnote counts them and the table lists them.
  """
  points = record["points"]
  if not points:
    raise ValueError("the record has no training points to plot.")
  fig, axes = plt.subplots(
    1, len(points), figsize=(4.0 * len(points) + 1.0, 4.0), sharey=True, squeeze=False
  )
  omitted = 0
  for ax, point in zip(axes[0], points, strict=True):
    for label, spectrum in point["classes"].items():
      values = np.asarray(spectrum["eigenvalues"])
      index = np.arange(1, len(values) + 1)
      positive = values > 0
      omitted += int((~positive).sum())
      ax.plot(index[positive], values[positive], marker="o", label=_class_label(record, label))
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (1 = largest)")
    ax.set_xticks(np.arange(1, record["settings"]["top_k"] + 1))
    accuracy = point.get("test_accuracy")
    suffix = f", test acc. {accuracy:.3f}" if accuracy is not None else ""
    ax.set_title(f"after epoch {point['epoch']} (step {point['step']}{suffix})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
  axes[0, 0].set_ylabel("Hessian eigenvalue of the class's mean loss")
  axes[0, -1].legend(fontsize=8)
  settings = record["settings"]
  fig.suptitle(
    f"{record['dataset']}, {record['model']}: top {settings['top_k']} Hessian eigenvalues, "
    f"{settings['examples_per_class']} training examples per class"
  )
  if omitted:
    fig.text(0.01, 0.01, f"{omitted} non-positive eigenvalues not shown (log scale).", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def spectrum_table(record: dict) -> str:
  """Returns a Markdown table: one row per (epoch, class), the eigenvalues largest first."""
  settings = record["settings"]
  k = settings["top_k"]
  # A record written before the "batch_norm" key existed gets no BatchNorm mention.
  batch_norm = "BatchNorm in eval mode, " if record.get("batch_norm") else ""
  lines = [
    f"Top {k} Hessian eigenvalues of the mean cross-entropy over {settings['examples_per_class']} "
    f"training examples per class ({record['dataset']}, {record['model']}, {batch_norm}"
    f"{settings['num_iterations']} Lanczos iterations). The last column is the largest "
    "residual norm, a bound on each value's distance to an eigenvalue.",
    "",
    "| epoch | class | " + " | ".join(f"λ{i}" for i in range(1, k + 1)) + " | max residual |",
    "|---" * (k + 3) + "|",
  ]
  for point in record["points"]:
    for label, spectrum in point["classes"].items():
      values = " | ".join(f"{value:.4g}" for value in spectrum["eigenvalues"])
      residual = max(spectrum["residual_norms"])
      lines.append(
        f"| {point['epoch']} | {_class_label(record, label)} | {values} | {residual:.2g} |"
      )
  return "\n".join(lines) + "\n"
