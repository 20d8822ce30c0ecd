"""Who is who and who may do what: consortium PKI, roles, the mTLS server, site binding, sidecar and gateway."""
