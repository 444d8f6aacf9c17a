# unet-pipe: the U-Net of Ronneberger et al. (2015) for whole EM stacks.
# This file only wires; rules live in workflow/rules/, logic in src/unet_pipe/.
from snakemake.utils import min_version

min_version("9.0")


# The demo config is the default; a --configfile given on the command line
# replaces it instead of being merged into it (no demo dataset in your runs).
# Several --configfile files are overlays, composed in order by unet-pipe's
# rule (workflow/rules/common.smk, unet_pipe.config.compose_configs).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"



include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/weights.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/postprocess.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/view.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/bundle.smk"
include: "workflow/rules/summary.smk"


rule all:
    input:
        all_targets(),
    default_target: True
