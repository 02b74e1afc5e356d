"""Numbers and figures from (logits, targets, class names). Holds no training state; imports no model or data."""
