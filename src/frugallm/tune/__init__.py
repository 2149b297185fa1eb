"""frugallm.tune: adapting open weights (supervised fine-tuning data in ``sft``)."""
