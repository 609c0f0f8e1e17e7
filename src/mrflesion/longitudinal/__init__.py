"""New and enlarging lesions between two sessions (Krüger et al. 2020): pairing, halfway-space
preprocessing of the two FLAIRs, a siamese 3D network, a classical subtraction comparator and the
lesion-wise evaluation. Pure array functions; the rule bodies (:mod:`mrflesion.steps.longitudinal`)
read and write the files."""
