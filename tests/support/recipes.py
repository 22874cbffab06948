"""The small recipe that the Airflow tests (REST API in local mode, the compose deployment) put in the trigger
form: a run that trains in about a minute on two CPU cores and still passes the promotion gate, so that it
asks a reviewer.

The gate must pass: the absolute floors are off and the Random Forest to beat is one tree (0.23-0.26 macro
F1 on this pack). 40 px is the smallest size that gets the ImageNet stem (dermaops.models): about 4x less
compute than the small stem at 28 px (88 vs 21 images/s here). Six epochs of 500 images, each once: the
deployment test's fault lands between two epoch checkpoints; quick-cpu's 4,000 class-balanced draws per epoch
are for the whole pack. Measured with benchmarks/recipe_ablation.py on the tests' small pack
(tests/support/pipeline_packs.py): seed 42 validation macro F1 0.33, test 0.31; seed 7 validation 0.28,
test 0.34; 34 s of training. (4 epochs gave 0.26, the recipe's balanced draws 0.19.)
"""

from __future__ import annotations

SMALL_FORM = {
    "epochs": 6,
    "finetune_epochs": 0,
    "image_size": 40,
    "batch_size": 64,
    "epoch_images": 500,
    "sampling_power": 1,
    "class_weight_power": 0.5,
    "baseline_trees": 1,
    "mel_recall_floor": 0,
    "min_macro_f1": 0,
    "min_macro_auc": 0,
}
