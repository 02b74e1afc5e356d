"""Model builders: nn.Modules from plain numbers (classes, channels, image size). No data, paths or devices."""
