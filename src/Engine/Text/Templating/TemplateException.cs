namespace LocalVllm.Engine.Text.Templating;

/// <summary>A chat template that could not be parsed or rendered; the message names the construct, line and column.</summary>
public sealed class TemplateException(string message) : Exception(message);
