namespace LocalVllm.Engine.Text.Templating;

/// <summary>The template called <c>raise_exception(message)</c>; <see cref="Exception.Message"/> is the template's message.</summary>
public sealed class TemplateRaisedException(string message) : Exception(message);
