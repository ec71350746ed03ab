"""data_prep: offline stages that turn benchmark files into training-ready Arrow shards with token roles."""
