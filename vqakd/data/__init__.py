"""The files a run reads and how they are made: annotations, vocabulary, question files (with the
question-type rule), GloVe, the feature table and the batches (docs/architecture.md).
"""
