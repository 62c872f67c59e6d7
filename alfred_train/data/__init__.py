"""Data: tokenizers, prompt templates, JSONL records, SFT packing, sampling and the synthetic task.

    tokenizer.py    Tokenizer interface, SentencePieceTokenizer, HFJsonTokenizer, load_tokenizer,
                    train_sentencepiece
    records.py      typed records (Message, SFTExample, PreferencePair, PromptExample) + checks
    templates.py    stackllama / tulu / vicuna / stable-vicuna / plain; get_template, render_prompt
    datasets.py     readers of our records form (file:line errors), encode_sft / encode_prompt / encode_scored
    files.py        rows of a .jsonl / .jsonl.gz / .parquet file, each with its path:line
    formats.py      public formats as published (hh-rlhf, dolly, alpaca, sharegpt, stack-exchange-paired;
                    detection, bad records)
    oasst1.py       oasst1's message table -> best-ranked threads, ranked sibling pairs, prompts
    mixture.py      data.train / valid / prompts: one file or a weighted mixture, held-out split
    inspect.py      `alfred-train data inspect FILE`
    packing.py      pack_examples (SFT blocks), pad_examples, pad_batch / collate_pairs (RM)
    sampler.py      deterministic data-parallel sampler resumable from consumed_samples
    sft_dataset.py  SFTDataset: encode, shuffle, pack, batch
    synthetic.py    the cheerful-word-list demo task and its ground-truth property_score
    corpus.py       the tiny corpus and the shipped tiny sentencepiece model (assets/)
"""
