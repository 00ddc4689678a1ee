"""Statistics: pooling rules, bootstrap, regression."""
