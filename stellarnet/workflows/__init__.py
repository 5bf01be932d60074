"""What an entry point does, as a library function taking a configuration: build the refinement
stage of a model folder (:mod:`.refinement`), train and score the baselines (:mod:`.baselines`),
the results catalogue (:mod:`.catalogue`). Entry points and the pipeline call these; they may use
every library layer below."""
