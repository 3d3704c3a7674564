namespace LocalVllm.Engine;

/// <summary>What each <see cref="RequestOutput"/> of a request carries, as vLLM's <c>RequestOutputKind</c>.</summary>
public enum RequestOutputKind
{
    /// <summary>Every output holds the whole text, token ids and log-probabilities so far (vLLM's default).</summary>
    Cumulative,
    /// <summary>
    /// Every output holds only what is new since the request's previous output: the new text, token ids and
    /// log-probabilities of each completion that progressed. Concatenated, the deltas equal the cumulative output.
    /// The cost per step does not grow with the length of the text: use it for streaming.
    /// </summary>
    Delta,
    /// <summary>One output per request, when it finishes, holding everything (what <see cref="Llm"/> uses).</summary>
    FinalOnly,
}
