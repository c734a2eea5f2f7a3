"""F1 as an `evaluate` module that loads offline: `evaluate.load(<this directory>)`."""

import datasets
import evaluate
from sklearn.metrics import f1_score

_DESCRIPTION = (
    "F1 = 2 · precision · recall / (precision + recall); `average` as in sklearn (default 'macro')."
)
_KWARGS_DESCRIPTION = (
    "predictions: predicted labels; references: true labels; average: binary, micro, macro or weighted."
)


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, average="macro", sample_weight=None):
        return {"f1": float(f1_score(references, predictions, average=average, sample_weight=sample_weight))}
