"""An example statelab plugin: a sliding-window mean memory."""
