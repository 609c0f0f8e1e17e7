# Validate the configuration (and fill schema defaults) before anything else; one-line errors.
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, os.path.join(workflow.basedir, "src"))

from mrflesion.config import ConfigError, check_config

try:
    check_config(config, os.path.join(workflow.basedir, "config.schema.yaml"))
except ConfigError as exc:
    raise WorkflowError(f"mrflesion: {exc}") from None

validate(config, os.path.join(workflow.basedir, "config.schema.yaml"))
