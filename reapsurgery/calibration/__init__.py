"""Stage 1, measuring experts: a transformers skeleton on the meta device filled one decoder layer
at a time, the routing observed where each family combines its experts' outputs, statistics into
saliency.json.
Needs torch and transformers; never imports the surgery stage."""
