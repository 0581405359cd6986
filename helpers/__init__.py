"""The course toolbox: load a model, apply a fine-tuning method, data, training, evaluation, plots.

    import helpers
    model, tokenizer = helpers.load_model("tiny")          # or "THUDM/chatglm-6b-int4" on a GPU
    setup = helpers.lora(model, r=8)                        # freeze / embedding / ptuning_v2 / lora
    print(setup)                                            # trainable params: N || all params: M || ...
    data = helpers.EncodedDataset(tokenizer, "ie", helpers.load_split("ie", "train"))
    result = helpers.train(setup, tokenizer, data, "runs/lora-ie", task="ie", max_steps=100)
    helpers.evaluate(setup.model, tokenizer, "ie", helpers.load_split("ie", "test"), out_dir=result.run_dir)
    helpers.plot_loss_curves(helpers.load_runs("runs"))

A run of the main job is described by a :class:`Recipe` (``helpers.resolve_recipe``: defaults plus overrides,
checked before any weights load) and recorded by a :class:`RunRecord` (``run.json``).
"""

import warnings

# peft asks transformers an old question on every LoRA setup; the answer is right, the warning is noise.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

from .data import EncodedDataset, load_split  # noqa: E402
from .evaluation import evaluate, generate_answers, perplexity  # noqa: E402
from .methods import (  # noqa: E402
    METHODS,
    MethodSetup,
    apply_method,
    embedding,
    freeze,
    lora,
    ptuning_v2,
    resolve_method_options,
    trainable_report,
)
from .models import check_model_source, load_model, meta_model  # noqa: E402
from .pipeline import compare, run_method  # noqa: E402
from .plotting import plot_comparison, plot_loss_curves, plot_reference_curves  # noqa: E402
from .recipe import Recipe, resolve_recipe  # noqa: E402
from .runs import RunRecord, load_run, load_runs  # noqa: E402
from .training import load_finetuned, train  # noqa: E402

__all__ = [
    "METHODS",
    "EncodedDataset",
    "MethodSetup",
    "Recipe",
    "RunRecord",
    "apply_method",
    "check_model_source",
    "compare",
    "embedding",
    "evaluate",
    "freeze",
    "generate_answers",
    "load_finetuned",
    "load_model",
    "load_run",
    "load_runs",
    "load_split",
    "lora",
    "meta_model",
    "perplexity",
    "plot_comparison",
    "plot_loss_curves",
    "plot_reference_curves",
    "ptuning_v2",
    "resolve_method_options",
    "resolve_recipe",
    "run_method",
    "train",
    "trainable_report",
]
