"""A fleet: a group of nodes on many hosts, from one YAML file, over SSH."""
