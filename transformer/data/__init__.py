"""Text to token ids: the SentencePiece tokenizer, batches of similar length, and the prepared (binarized) corpus."""
