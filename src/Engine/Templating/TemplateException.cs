namespace LocalVllm.Engine.Templating;

/// <summary>A chat template that could not be parsed or rendered; the message names the construct, line and column.</summary>
public sealed class TemplateException(string message) : Exception(message);

/// <summary>The template called <c>raise_exception(message)</c>; <see cref="Exception.Message"/> is the template's message.</summary>
public sealed class TemplateRaisedException(string message) : Exception(message);
