"""Training, evaluation and SavedModel export of the carrecog classifiers."""
