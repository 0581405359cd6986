"""The course toolbox: load a model, apply a fine-tuning method, train, evaluate, compare, plot.

    import helpers
    model, tokenizer = helpers.load_model("tiny")          # or "THUDM/chatglm-6b-int4" on a GPU
    setup = helpers.lora(model, r=8)                        # freeze / embedding / ptuning_v2 / lora
    print(setup)                                            # trainable params: N || all params: M || ...
    data = helpers.EncodedDataset(tokenizer, "ie", helpers.load_split("ie", "train"))
    result = helpers.train(setup, tokenizer, data, "runs/lora-ie", task="ie", steps=100)
    helpers.evaluate(setup.model, tokenizer, "ie", helpers.load_split("ie", "test"), out_dir=result.run_dir)
    helpers.plot_loss_curves(helpers.load_runs("runs"))

The package's parts: ``tasks/`` (the three tasks: rows, token layout, metrics), ``run/`` (a run from its
:class:`Recipe` to its :class:`RunRecord`: folder policy, training, evaluation, the one run path), ``course/`` (what
the notebooks call), ``tiny/`` (the embedded tiny model); next to them the model loader (``models``), the methods
(``methods``), the memory model (``estimate``), the figures (``plotting``) and the published results (``reference``).
"""

import warnings

# peft asks transformers an old question on every LoRA setup; the answer is right, the warning is noise.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

from .methods import METHODS, MethodSetup, apply_method, embedding, freeze, lora, ptuning_v2  # noqa: E402
from .models import check_model_source, load_model, meta_model  # noqa: E402
from .plotting import plot_comparison, plot_loss_curves, plot_reference_curves  # noqa: E402
from .run.artifacts import load_finetuned  # noqa: E402
from .run.evaluation import evaluate, generate_answers, heldout_perplexity, perplexity  # noqa: E402
from .run.pipeline import compare, run_recipe  # noqa: E402
from .run.recipe import Recipe, resolve_recipe  # noqa: E402
from .run.record import Run, RunRecord, load_run, load_runs  # noqa: E402
from .run.training import train  # noqa: E402
from .tasks import EncodedDataset, load_split  # noqa: E402

__all__ = [
    "METHODS", "EncodedDataset", "MethodSetup", "Recipe", "Run", "RunRecord", "apply_method", "check_model_source",
    "compare", "embedding", "evaluate", "freeze", "generate_answers", "heldout_perplexity", "load_finetuned",
    "load_model", "load_run", "load_runs", "load_split", "lora", "meta_model", "perplexity", "plot_comparison",
    "plot_loss_curves", "plot_reference_curves", "ptuning_v2", "resolve_recipe", "run_recipe", "train",
]
