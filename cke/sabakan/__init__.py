"""The sabakan integration: generate the cluster from sabakan's machines and a template
(:mod:`cke.sabakan.generator`), queue repairs from its failure reports
(:mod:`cke.sabakan.autorepair`); the leader's side is :mod:`cke.sabakan.integration`."""
