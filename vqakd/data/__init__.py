"""The files a run reads and how they are made: annotations, vocabulary, question files (with the
question-type rule), GloVe, the feature table and the batches.

  annotations.py  MSVD-QA / MSRVTT-QA annotation files and their video lists
  vocab.py        the question and answer vocabularies
  questions.py    tokenizing, question types, encoding and reading the question files
  glove.py        GloVe text and pickle files
  features.py     the HDF5 feature files as one table (memory, GPU, float16 or lazy)
  batches.py      a run's splits, datasets and loaders
"""
