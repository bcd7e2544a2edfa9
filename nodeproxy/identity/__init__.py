"""Workload identity: SPIFFE IDs and X.509-SVIDs, the CA, its CSR-signing service and the node's
certificate manager (docs/identity.md)."""
