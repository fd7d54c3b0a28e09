"""The reference speech engine, `car-grpc voice-engine` (README: Voice): PocketSphinx
speech to text and eSpeak NG text to speech on `VoiceService.ServeVoice`. A client of the
public gRPC API like any other engine: it imports the generated code and the wire package,
never the core. Needs the `voice` extra (`pip install 'car-grpc[voice]'`)."""
