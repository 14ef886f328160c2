"""An exported model as an MLflow pyfunc that labels sentence pairs (``mlflow models serve`` and the registry).

Logged "from code": MLflow copies this file beside the model's folder and runs it to load the model,
so serving needs mlflow, torch and transformers, not dist-robust. Input: a table with columns
``sentence1`` and ``sentence2``; output: ``label`` (the task's label name) and ``score`` (its
probability), one row per pair.
"""

from __future__ import annotations

import mlflow.pyfunc
from mlflow.models import set_model

MODEL_ARTIFACT = "model"  # the exported folder (config with label names, safetensors, tokenizer)


class PairClassifier(mlflow.pyfunc.PythonModel):
    """A sequence-pair classifier from a Hugging Face folder, predicting label names."""

    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = context.artifacts[MODEL_ARTIFACT]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        self.labels = self.model.config.id2label
        self.torch = torch

    def predict(self, context, model_input, params=None):
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = {"sentence1", "sentence2"} - set(frame.columns)
        if missing:
            raise ValueError(f"input needs the columns sentence1 and sentence2 (missing: {', '.join(sorted(missing))})")
        rows = []
        for start in range(0, len(frame), 32):
            part = frame.iloc[start:start + 32]
            batch = self.tokenizer(list(part["sentence1"].astype(str)), list(part["sentence2"].astype(str)),
                                   padding=True, truncation=True, max_length=512, return_tensors="pt")
            with self.torch.no_grad():
                probs = self.model(**batch).logits.softmax(-1)
            score, index = probs.max(-1)
            rows += [{"label": self.labels[int(i)], "score": float(s)} for i, s in zip(index, score)]
        return pd.DataFrame(rows, columns=["label", "score"])


set_model(PairClassifier())
