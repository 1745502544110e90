"""The cke server: election, the control loop, the executor and the HTTP endpoint."""
