"""explainctl: meaningful-perturbation explanations of image classifiers at audit scale.

This package is the light side (CLI, configuration, job records, storage, report);
it never imports torch. The torch side lives in `explainctl_worker`.
"""

__version__ = "0.1.0"
