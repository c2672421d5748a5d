"""Pretraining data for megatron-mhc, one module per job:

* :mod:`.paths`: where the shipped corpus and tokenizer are, and the default cache directory;
* :mod:`.tokenizer`: the shipped byte-level BPE, read with Hugging Face ``tokenizers``;
* :mod:`.jsonl`: reading jsonl(.gz/.xz/.bz2) documents with errors naming the file and line;
* :mod:`.preprocess`: jsonl -> Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``);
* :mod:`.default_corpus`: the embedded corpus' dataset, built once into a locked cache;
* :mod:`.flag_checks`: checks of a launch's ``--data-path`` and tokenizer flags, before any
  setup.

With megatron.training the data are already tokenized, so a run only needs the vocabulary size
and the end-of-document id: ``--tokenizer-type NullTokenizer --vocab-size 8192`` (eod =
vocab_size - 1 = the id of ``<|endoftext|>``) needs no extra package;
``--tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizer`` gives the same ids and
eod and also detokenizes, but needs ``transformers``.
"""
