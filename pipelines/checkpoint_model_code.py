"""The code MLflow keeps in each checkpoint's logged model ("models from code", no
pickle) and runs at load time: it names :class:`pipelines.checkpoint_model.CheckpointModel`."""

import mlflow.models

from pipelines.checkpoint_model import CheckpointModel

mlflow.models.set_model(CheckpointModel())
