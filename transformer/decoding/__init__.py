"""From a trained model to sentences: beam and greedy search, the engines behind one interface, reranking, int8."""
