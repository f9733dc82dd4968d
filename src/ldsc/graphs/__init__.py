"""Stage 2, token vectors to graphs: nearest-neighbour search (:mod:`.search`), sparse kNN graphs
of batches and of whole data sets with their memory estimate (:mod:`.knn`), attention graphs
(:mod:`.attention`). Imports only the features stage (and the shared utilities)."""
